"""Every preset trained on the shared CIFAR-10 for a short budget: kNN and linear accuracy per preset, beside the
figure its reference published where one exists.

    .venv/bin/python benchmarks/bench_reproduce.py                 # on a GPU: the six presets at once, one process
                                                                   # each sharing the device, about 8 minutes
    .venv/bin/python benchmarks/bench_reproduce.py --device cpu    # CPU scale: a check of the script, not figures

The GPU run (the default where CUDA is available): amdim, cpc_v2, simclr, byol, moco_v2 and yadim, each in its own
process on the one GPU (as a search with ``--gpus-per-trial 1/6``; ``--jobs``), ``--epochs`` (default 10) over all
50,000 training images of ``--data`` (the shared CIFAR-10 parquet), then kNN (k 200, temperature 0.1, against all
training images) and offline linear evaluation (``csl.evaluate.linear_eval``, ``--linear-epochs``) on the 10,000
test images. Each preset keeps every aspect and hyperparameter of its preset (``csl/presets.py``: augmentation,
extraction, similarity, loss, optimiser, learning rate, batch size, momentum target, queue) except the encoder's
size: at this budget every encoder is cut to about a CIFAR ResNet-18's forward cost (1.1 GFLOPs an image, printed
per preset): simclr, byol and moco_v2 train a ResNet-18 (CIFAR stem), as the CIFAR references they are set beside
do (the presets' ResNet-50 is their ImageNet encoder), and amdim, cpc_v2 and yadim their own encoders at a width
(``ENCODERS`` below). The trainer's defaults hold (bf16 autocast, channels_last; ``--compile`` compiles). A run
that would pass ``--minutes`` (default 8, the budget of the whole command) starts no further epoch and reports
where it stopped.

The budget was sized from the H100 figures in ``benchmarks/results/h100-2026-11-22`` (ResNet-18 steps of these
presets at 2,500-9,600 images/s alone; two processes sharing a GPU get 1.85x the work of one), not measured on an
H200: a first run should check the per-preset minutes it prints and move ``--epochs`` to fill the 8 minutes.

Published figures for such a short budget do not exist, except one: the MoCo CIFAR-10 demo's log, whose kNN after
epoch 10 (and 1, 5, 20, ...) of its 200-epoch run is printed where ``--epochs`` matches one of its logged epochs
(mid-schedule, its learning rate still near its peak, a linear head and no blur: a lower bound at best).
The figures of full-length runs are printed as well, with their budgets, so the distance is plain. AMDIM and YADIM
publish no CIFAR-10 figure found here (``../shared/notes/paper.md``: STL-10 only); the script says so.

Without a GPU (``--device cpu``) it runs at a CPU scale: every encoder at width 1/16, 512 training and 256 test
images, batch 64, 1 epoch, 5 linear epochs, one preset after another, the encoders otherwise as on the GPU; its
output says so, and its accuracies check that the script runs, nothing more.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import DEFAULT_DATA, add_common_args, describe_machine, setup, sync
import torch
from torch.utils.flop_counter import FlopCounterMode

# isort: on

PRESETS = ("amdim", "cpc_v2", "simclr", "byol", "moco_v2", "yadim")

# The encoder of each preset at the GPU budget: about a CIFAR ResNet-18's forward cost each.
ENCODERS: dict[str, dict[str, Any]] = {
    "amdim": {"width": 0.3},  # the AMDIM encoder, ndf 320 x 0.3
    "cpc_v2": {"width": 0.25},  # the layer-norm ResNet-50, on the 49 patches of an image
    "simclr": {"encoder": "resnet18"},
    "byol": {"encoder": "resnet18"},
    "moco_v2": {"encoder": "resnet18"},
    "yadim": {"width": 0.35},  # the wide ResNet-34
}


@dataclass(frozen=True)
class Published:
    """A figure a reference published: the metric (kNN or linear, %), its training budget and where it is."""

    metric: str
    value: float
    epochs: int
    budget: str
    source: str


LIGHTLY = "lightly CIFAR-10 benchmark, docs/source/getting_started/benchmarks/cifar10_benchmark.py"
MOCO_DEMO = "facebookresearch/moco colab/moco_cifar10_demo.ipynb"
# MoCo's demo logs its kNN monitor after every epoch of a 200-epoch cosine run (ResNet-18, batch 512, asymmetric
# loss, MoCo v1's linear head, v2's colour jitter without blur); these are the epochs read from its log.
DEMO_LOG = {1: 31.98, 5: 37.95, 10: 48.03, 20: 61.38, 30: 67.05, 40: 71.32, 50: 73.30}
PUBLISHED: dict[str, list[Published]] = {
    "amdim": [],
    "cpc_v2": [Published("linear", 84.52, 1000, "pl_bolts CPC v2, <= 24 h on one V100", "../shared/notes/paper.md")],
    "simclr": [Published("kNN", 82.8, 200, "ResNet-18, batch 512", LIGHTLY)],
    "byol": [Published("kNN", 87.2, 200, "ResNet-18, batch 512", LIGHTLY)],
    "moco_v2": [Published("kNN", 82.6, 200, "ResNet-18, batch 512, asymmetric", MOCO_DEMO),
                Published("linear", 90.7, 800, "ResNet-18, symmetric loss (its kNN 89.7)", MOCO_DEMO)]
    + [Published("kNN", value, epoch, f"after epoch {epoch} of its 200-epoch run: ResNet-18, batch 512, a linear "
                 "head and no blur, the learning rate still near its peak", MOCO_DEMO)
       for epoch, value in DEMO_LOG.items()],
    "yadim": [],
}


@dataclass(frozen=True)
class Scale:
    name: str
    overrides: dict[str, Any]  # into every preset's config
    encoders: dict[str, dict[str, Any]]
    train_limit: int | None
    test_limit: int | None
    epochs: int
    linear_epochs: int
    jobs: int


def scale_of(device: torch.device, args: argparse.Namespace) -> Scale:
    if device.type == "cuda":
        return Scale("GPU", {}, ENCODERS, args.train_limit, args.test_limit, args.epochs or 10,
                     args.linear_epochs or 20, args.jobs or len(args.presets))
    encoders = {p: {**ENCODERS[p], "width": 1 / 16} for p in PRESETS}
    return Scale("CPU", {"batch_size": 64}, encoders, args.train_limit or 512, args.test_limit or 256,
                 args.epochs or 1, args.linear_epochs or 5, args.jobs or 1)


def encoder_gflops(run: Any) -> float:
    """Forward GFLOPs (multiply-adds x 2) of the run's encoder on one image (on its patches, for CPC)."""
    image = torch.zeros(1, 3, 32, 32, device=run.device)
    view = run.pipeline.eval_view(image.to(torch.uint8))
    encoder = run.model.encoder
    was_training = encoder.training
    encoder.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(view.flatten(0, 1) if view.dim() == 5 else view)
    encoder.train(was_training)
    return counter.get_total_flops() / 1e9


def train_preset(preset: str, config: dict[str, Any], scale: Scale, deadline: float, threads: int
                 ) -> dict[str, Any]:
    """One preset in this process: train until its epochs are done or the next would pass the deadline; evaluate."""
    from csl.evaluate import extract_features, knn_accuracy, linear_eval
    from csl.train import Run

    torch.set_num_threads(threads)
    start = time.time()
    run = Run(config)
    gflops = encoder_gflops(run)
    epoch_seconds = 0.0
    while run.epoch < run.config["epochs"]:
        if run.epoch and time.time() + epoch_seconds > deadline:
            break
        metrics = run.train_epoch()
        epoch_seconds = metrics["epoch_time"]
    batch = max(256, run.config["batch_size"])
    kwargs = {"batch_size": batch, "device": run.device, "autocast": run.autocast}
    train_x, train_y = extract_features(run.model, run.pipeline, run.train_data, **kwargs)
    test_x, test_y = extract_features(run.model, run.pipeline, run.test_data, **kwargs)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=run.config["knn_k"],
                       temperature=run.config["knn_temperature"], num_classes=run.num_classes)
    linear = linear_eval(train_x.float(), train_y, test_x.float(), test_y, num_classes=run.num_classes,
                         epochs=scale.linear_epochs, seed=run.config["seed"])
    sync(run.device)
    return {"preset": preset, "encoder": run.config["encoder"], "width": run.config["width"], "gflops": gflops,
            "epochs": run.epoch, "planned": run.config["epochs"], "minutes": (time.time() - start) / 60,
            "knn": 100 * knn, "linear": 100 * linear, "ssl_loss": metrics["ssl_loss"],
            "images_per_s": metrics["images_per_s"]}


def preset_config(preset: str, scale: Scale, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {"method": preset, **scale.encoders[preset], **scale.overrides, "epochs": scale.epochs,
            "train_limit": scale.train_limit, "test_limit": scale.test_limit, "data": args.data,
            "device": str(device), "seed": args.seed, "compile": args.compile}


def published_line(preset: str, epochs: int, full_data: bool) -> str:
    """The reference's figures: at this budget where one was published (all 50,000 images, these epochs), and
    those of full-length runs with their budgets."""
    figures = PUBLISHED[preset]
    if not figures:
        return "none published for CIFAR-10 (found: STL-10 only)"
    matched = [f for f in figures if f.epochs == epochs and full_data]
    parts = [f"{f.metric} {f.value:.1f} at this budget ({f.budget}; {f.source})" for f in matched]
    if not matched:
        parts.append(f"none at {epochs} epochs" + ("" if full_data else " on a subset"))
    parts += [f"{f.metric} {f.value:.1f} after {f.epochs} epochs ({f.budget}; {f.source})"
              for f in figures if f.epochs != epochs and f.epochs >= 100]
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--presets", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                        default=list(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="per preset (default: 10 on GPU, 1 on CPU)")
    parser.add_argument("--train-limit", type=int, default=None, help="default: all on GPU, 512 on CPU")
    parser.add_argument("--test-limit", type=int, default=None, help="default: all on GPU, 256 on CPU")
    parser.add_argument("--linear-epochs", type=int, default=None, help="default: 20 on GPU, 5 on CPU")
    parser.add_argument("--jobs", type=int, default=None,
                        help="presets training at once, one process each (default: all on GPU, 1 on CPU)")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="wall-clock budget of the whole run: no epoch starts that would end after it")
    parser.add_argument("--compile", action="store_true", help="the trainer's compile option (30-40 s a process)")
    args = parser.parse_args()
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        raise SystemExit(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    args.data = args.data or DEFAULT_DATA

    device = setup(args)
    scale = scale_of(device, args)
    start = time.time()
    deadline = start + 60 * args.minutes
    threads = args.threads or max(1, (os.cpu_count() or 1) // scale.jobs)
    print(f"Presets on CIFAR-10 ({args.data}): {describe_machine(device)}")
    if scale.name == "CPU":
        print("  CPU scale: width 1/16, 512 training / 256 test images, batch 64, 1 epoch: a check that the script "
              "runs; the accuracies below are not a reproduction of anything")
    print(f"  {scale.epochs} epochs per preset, {scale.jobs} at once ({threads} CPU threads "
          f"each), {scale.linear_epochs} linear epochs, budget {args.minutes:g} minutes; every other setting is "
          f"the preset's", flush=True)

    configs = {p: preset_config(p, scale, args, device) for p in args.presets}
    results: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=scale.jobs, mp_context=context) as pool:
        futures = {pool.submit(train_preset, p, configs[p], scale, deadline, threads): p for p in args.presets}
        for future in concurrent.futures.as_completed(futures):
            preset = futures[future]
            try:
                results[preset] = future.result()
            except Exception as error:  # one preset failing must not lose the others' figures
                results[preset] = {"preset": preset, "error": f"{type(error).__name__}: {error}"}
            line = results[preset]
            if "error" in line:
                print(f"  {preset}: FAILED {line['error']}", flush=True)
            else:
                print(f"  {preset}: done in {line['minutes']:.1f} min ({line['epochs']}/{line['planned']} epochs, "
                      f"{line['images_per_s']:.0f} img/s)", flush=True)

    print(f"\n{'preset':<8} {'encoder':<22} {'GFLOPs':>6} {'epochs':>7} {'min':>5} {'kNN %':>6} {'linear %':>8}  "
          f"published")
    for preset in args.presets:
        line = results[preset]
        if "error" in line:
            print(f"{preset:<8} failed: {line['error']}")
            continue
        encoder = f"{line['encoder']} x{line['width']:g}"
        stopped = "" if line["epochs"] == line["planned"] else " (stopped at the time budget)"
        print(f"{preset:<8} {encoder:<22} {line['gflops']:6.3f} {line['epochs']:>3}/{line['planned']:<3} "
              f"{line['minutes']:5.1f} {line['knn']:6.2f} {line['linear']:8.2f}  "
              f"{published_line(preset, line['planned'], scale.train_limit is None)}{stopped}")
    print(f"\nwall clock {(time.time() - start) / 60:.1f} min for the whole run")
    if any("error" in line for line in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

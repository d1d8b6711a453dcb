"""What the data path costs: our end-to-end training step against the same step on views made beforehand.

    .venv/bin/python benchmarks/bench_step.py                           # CPU default: simclr, width 0.25
    .venv/bin/python benchmarks/bench_step.py --repeats 5 --threads 1
    .venv/bin/python benchmarks/bench_step.py --device cuda --width 1 --steps 50 --warmup 10   # target >= 0.8
    .venv/bin/python benchmarks/bench_step.py --profile                 # where the time of one step goes
    .venv/bin/python benchmarks/bench_step.py --device cuda --compile   # the model and augmentation compiled

Both sides call ``run.train_step`` of one ``csl.train.Run`` (``--method``, default simclr, with a ResNet-18 at
``--width``, batch ``--batch-size``) on the first ``--limit`` images of the shared CIFAR-10 parquet:

- end to end: uint8 batches drawn from the data set held on the device (``run.train_data.batches``), so the
  step includes indexing the batch and the batched augmentation, then everything else;
- model only: ``run.pipeline`` swapped for a lookup of views the pipeline made before the clock started (on the
  device, ``--cached`` batches cycled), so the step is the same forward, backward, optimiser step, EMA and probe.

The ratio end-to-end / model-only images/s is the share of the step's speed the data path keeps (1.0: free).
Blocks of ``--warmup`` untimed and ``--steps`` timed steps alternate ``--repeats`` times; figures are medians.

``--profile`` runs ``torch.profiler`` over ``--steps`` end-to-end steps instead, with the stages labelled
(augmentation, encoder forward, head forward, similarity + loss forward, backward, optimiser, EMA, probe), and
prints the time of each stage per step, the backward time by autograd function, and the top operators.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import (
    add_common_args,
    add_network_args,
    cycle_batches,
    default_width,
    describe_machine,
    interleave,
    load_pair,
    median,
    paired_ratios,
    rates,
    resnet18_summary,
    run_block,
    setup,
    spread,
    sync,
    timed,
)
import torch
from torch import Tensor

# isort: on
from csl.train import Run


class CachedViews:
    """Stands in for ``run.pipeline``: returns views computed earlier, in turn, whatever images it is given."""

    def __init__(self, views: list[tuple[Tensor, Tensor]]) -> None:
        self.views = views
        self.index = 0

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        views = self.views[self.index % len(self.views)]
        self.index += 1
        return views


def model_only_block(run: Run, cached: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Callable[[int, int], float]:
    """``run.train_step`` with the pipeline replaced by precomputed views, and the batches already drawn."""
    pipeline = CachedViews([(a, b) for _, _, a, b in cached])
    turn = iter(range(1 << 62))

    def block(warmup: int, steps: int) -> float:
        real = run.pipeline
        run.pipeline = pipeline
        try:
            def step() -> None:
                images, labels, _, _ = cached[next(turn) % len(cached)]
                run.train_step(images, labels)

            for _ in range(warmup):
                step()

            def go() -> None:
                for _ in range(steps):
                    step()

            return timed(run.device, go)
        finally:
            run.pipeline = real

    return block


def precompute(run: Run, batches: Iterator[tuple[Tensor, Tensor]], count: int) -> list[tuple[Tensor, ...]]:
    cached = []
    for _ in range(count):
        images, labels = next(batches)
        view_a, view_b = run.pipeline(images, run.generator)
        cached.append((images, labels, view_a, view_b))
    sync(run.device)
    return cached


# ---------------------------------------------------------------------------------------------------- profiling

STAGES = ("augment", "encoder forward", "head forward", "similarity+loss forward", "backward", "optimizer step",
          "zero_grad", "EMA target update", "probe (fwd+bwd+step)")


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(f"stage: {label}"):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def stage_labels(run: Run) -> Iterator[None]:
    """Wrap each stage of ``run.train_step`` in a profiler label, on this instance only; undone on exit."""
    model = run.model
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, label: str) -> None:
        saved.append((owner, name, owner.__dict__.get(name, None)))
        setattr(owner, name, _labelled(label, getattr(owner, name)))

    patch(run, "pipeline", "augment")
    patch(model.encoder, "forward", "encoder forward")
    patch(model.extract, "embed", "head forward")
    patch(model.extract, "pairs", "similarity+loss forward")
    patch(model.similarity, "forward", "similarity+loss forward")
    patch(model.loss, "forward", "similarity+loss forward")
    patch(run.optimizer, "step", "optimizer step")
    patch(run.optimizer, "zero_grad", "zero_grad")
    patch(model, "update_target", "EMA target update")
    patch(run.probe, "forward", "probe (fwd+bwd+step)")
    patch(run.probe_optimizer, "zero_grad", "probe (fwd+bwd+step)")
    patch(run.probe_optimizer, "step", "probe (fwd+bwd+step)")
    original_backward = Tensor.backward
    calls = {"n": 0}

    def backward(self: Tensor, *args: Any, **kwargs: Any) -> Any:
        # train_step calls backward twice per step: the SSL loss, then the probe's loss.
        label = "backward" if calls["n"] % 2 == 0 else "probe (fwd+bwd+step)"
        calls["n"] += 1
        with torch.profiler.record_function(f"stage: {label}"):
            return original_backward(self, *args, **kwargs)

    Tensor.backward = backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        Tensor.backward = original_backward  # type: ignore[method-assign]
        for owner, name, value in reversed(saved):
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def profile_steps(run: Run, batches: Iterator[tuple[Tensor, Tensor]], warmup: int, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    if not run.config["probe"]:
        raise SystemExit("--profile expects the online probe on (it labels the second backward as the probe's)")
    for _ in range(warmup):
        run.train_step(*next(batches))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with stage_labels(run), profile(activities=activities) as prof:
        sync(run.device)
        with torch.profiler.record_function("stage: whole step"):
            for _ in range(steps):
                run.train_step(*next(batches))
            sync(run.device)
    events = prof.key_averages()
    total: dict[str, float] = defaultdict(float)
    for event in events:
        if event.key.startswith("stage: "):
            total[event.key[len("stage: "):]] += event.cpu_time_total / 1e3 / steps  # ms per step
    whole = total.pop("whole step", sum(total.values()))
    print(f"\nwhere one step's time goes (host wall time, ms per step, mean of {steps} profiled steps)")
    if run.device.type == "cuda":
        print("  (on CUDA the host times are launch times; see the CUDA columns of the operator table)")
    for stage in STAGES:
        if stage in total:
            print(f"  {stage:<26} {total[stage]:9.1f}  {100 * total[stage] / whole:5.1f}%")
    rest = whole - sum(total.values())
    print(f"  {'other (lr, slicing, ...)':<26} {rest:9.1f}  {100 * rest / whole:5.1f}%")
    print(f"  {'whole step':<26} {whole:9.1f}  -> {run.config['batch_size'] / whole * 1e3:.1f} images/s under the "
          f"profiler")

    backward: dict[str, float] = defaultdict(float)
    prefix = "autograd::engine::evaluate_function: "
    for event in events:
        if event.key.startswith(prefix):
            backward[event.key[len(prefix):]] += event.cpu_time_total / 1e3 / steps
    print("\nbackward by autograd function (ms per step, top 12)")
    for name, ms in sorted(backward.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:<40} {ms:9.1f}")
    sort = "self_device_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntop operators by self time ({steps} steps)")
    print(events.table(sort_by=sort, row_limit=20, max_name_column_width=48))


# --------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--method", default="simclr", help="a preset (its encoder is replaced by --encoder)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--width", type=float, default=None, help="encoder width (default: 1 on GPU, 0.25 on CPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=2048, help="training images held on the device")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per block")
    parser.add_argument("--initial-warmup", type=int, default=2,
                        help="more untimed steps in each side's first block (oneDNN/cuDNN build kernels on first use)")
    parser.add_argument("--steps", type=int, default=2, help="timed (or profiled) steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per side")
    parser.add_argument("--cached", type=int, default=4, help="precomputed batches of views for the model-only side")
    parser.add_argument("--profile", action="store_true", help="profile end-to-end steps instead of the comparison")
    add_network_args(parser)
    parser.add_argument("--compile", action="store_true",
                        help="the trainer's compile option: torch.compile the model and the augmentation")
    args = parser.parse_args()

    device = setup(args)
    width = default_width(args.width, device)
    train, test = load_pair(args.data, max(args.limit, args.batch_size), 256)
    config = {"method": args.method, "encoder": args.encoder, "width": width, "batch_size": args.batch_size,
              "device": str(device), "seed": args.seed, "data": args.data, "compile": args.compile,
              "amp": args.amp, "channels_last": args.channels_last}
    run = Run(config, data=(train, test))
    batches = cycle_batches(run.train_data, args.batch_size, run.generator)

    encoder = resnet18_summary(width) if args.encoder == "resnet18" else f"{args.encoder} width x{width:g}"
    print(f"{args.method} training step, end to end vs model only: {describe_machine(device)}")
    print(f"  {encoder}; batch {args.batch_size}, {len(train)} images 32x32; bf16 autocast {run.autocast}, "
          f"channels_last {run.channels_last}, compile {args.compile}")

    if args.profile:
        profile_steps(run, batches, args.warmup + args.initial_warmup, args.steps)
        return

    print(f"  blocks of {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} per side, alternating "
          f"(+{args.initial_warmup} warm-up steps in each side's first block)")
    cached = precompute(run, batches, args.cached)
    blocks = {"end to end": run_block(run, batches), "model only (cached views)": model_only_block(run, cached)}
    seconds = interleave(blocks, repeats=args.repeats, warmup=args.warmup, steps=args.steps,
                         initial_warmup=args.initial_warmup)
    e2e = rates(seconds["end to end"], args.batch_size)
    model = rates(seconds["model only (cached views)"], args.batch_size)
    pairs = paired_ratios(e2e, model)
    print(f"\nimages/s (median over blocks; width x{width:g}, batch {args.batch_size}, {device.type})")
    print(f"  end to end: {spread(e2e)}")
    print(f"  model only: {spread(model)}")
    print(f"  ratio end-to-end / model-only: {median(e2e) / median(model):.2f}   "
          f"(per round: {', '.join(f'{r:.2f}' for r in pairs)}; median {median(pairs):.2f})")
    print("  target: >= 0.8 on a GPU")


if __name__ == "__main__":
    main()

"""Helpers shared by the side-by-side benchmarks (throughput, bench_peer, bench_step, bench_quality).

Timing rules every script follows:

- decoding the data is never timed; both sides of a comparison read the same decoded uint8 images;
- each side runs in *blocks*: ``warmup`` untimed steps, then ``steps`` timed ones (the same numbers for every
  side), with the device synchronised before the clock starts and before it stops;
- blocks of the sides being compared alternate (A B B A A B ...), ``repeats`` times, so load from other processes
  on a shared machine falls on both; a figure is the median over blocks, and the ratio is the ratio of medians.

lightly is imported only here and only when a script needs it (``pip install -e '.[bench]'``).

Import this module before torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it, as
``bench_augment.py`` does. OpenMP reads the variable once, when torch loads it. With the default spin-waiting, a
two-thread parallel region on a machine whose cores other processes hold waits for a thread that is not running:
measured here at a load average of 7-9, our augmentation ran at ~600 images/s with 2 spinning threads against
~4,700 passive (~5,000 with 1 thread), and training steps swung 1-13 s where passive ones held 4-6 s.
``OMP_WAIT_POLICY=ACTIVE`` restores spinning (marginally faster on an idle machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the module docstring

import argparse  # noqa: E402
import contextlib  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from csl import data as datasets  # noqa: E402
from csl.encoders._common import scaled  # noqa: E402
from csl.registry import ENCODER  # noqa: E402

DEFAULT_DATA = "parquet:" + str(REPO.parent / "shared" / "data" / "cifar10")
SIZE = 32

# Block = Callable[[warmup, steps], seconds of the timed steps]
Block = Callable[[int, int], float]


# ----------------------------------------------------------------------------------------------- arguments, setup


def parse_bool(text: str) -> bool:
    """``true``/``false`` (any case, or 1/0), as ``csl``'s command line reads them."""
    lowered = text.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_network_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's ``amp`` and ``channels_last`` options, for experiments against their defaults."""
    parser.add_argument("--amp", type=parse_bool, default=True,
                        help="our trainer's amp option: bf16 autocast where the device computes bf16 natively "
                             "(GPUs, AMX CPUs); default true, as the trainer's")
    parser.add_argument("--channels-last", type=parse_bool, default=True,
                        help="our trainer's channels_last option (default true, as the trainer's)")


def add_common_args(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the main process (default: torch's, the core count)")
    if data:
        parser.add_argument("--data", default=DEFAULT_DATA, help="csl data spec (default: the shared CIFAR-10 parquet)")


def setup(args: argparse.Namespace) -> torch.device:
    """Seed, thread count and device; prints nothing."""
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return f"CPU, {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={policy} (torch {torch.__version__})"


def default_width(width: float | None, device: torch.device) -> float:
    """Full width on a GPU; a quarter on a CPU, where a full-width ResNet-18 runs at about 10 images/s."""
    if width is not None:
        return width
    return 1.0 if device.type == "cuda" else 0.25


def resnet18_summary(width: float) -> str:
    return (f"ResNet-18 (CIFAR stem) width x{width:g}: stages {scaled(64, width)}-{scaled(128, width)}-"
            f"{scaled(256, width)}-{scaled(512, width)} channels, {scaled(512, width)}-d vector")


# ----------------------------------------------------------------------------------------------------------- data


def load_split(spec: str, split: str, limit: int | None) -> Any:
    return datasets.load(spec, split=split, limit=limit)


def load_pair(spec: str, train_limit: int | None, test_limit: int | None) -> tuple[Any, Any]:
    return load_split(spec, "train", train_limit), load_split(spec, "test", test_limit)


def cycle_batches(data: Any, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled batches forever, epoch after epoch (``data.batches`` drops the last incomplete batch)."""
    while True:
        yield from data.batches(batch_size, generator)


# --------------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(blocks: Mapping[str, Block], *, repeats: int, warmup: int, steps: int, initial_warmup: int = 0,
               verbose: bool = True) -> dict[str, list[float]]:
    """Seconds per timed step of every block, ``repeats`` rounds, order reversed every other round (ABBA).

    ``initial_warmup`` more untimed steps go to each side's first block: oneDNN and cuDNN build or pick their
    kernels for each new shape and precision on first use (with torch 2.14 here the first CPU step is 1.2-1.5x
    the next ones; older versions took 20-30 s for the first bf16 steps).
    """
    names = list(blocks)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            extra = initial_warmup if round_ == 0 else 0
            per_step = blocks[name](warmup + extra, steps) / steps
            seconds[name].append(per_step)
            if verbose:
                print(f"  round {round_ + 1}/{repeats}  {name:<28} {per_step:8.3f} s/step", flush=True)
    return seconds


def rates(seconds_per_step: Sequence[float], images_per_step: int) -> list[float]:
    return [images_per_step / s for s in seconds_per_step]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """``median (min-max, n=...)`` of a list of rates."""
    if len(values) == 1:
        return f"{values[0]:10.1f}"
    return f"{median(values):10.1f}  (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    return median(numerator) / median(denominator)


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Ratio within each round (the two blocks ran next to each other, under similar load)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


# --------------------------------------------------------------------------------------------------------- memory


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_guard(device: torch.device, headroom: float = 0.85) -> Iterator[None]:
    """On the CPU, cap this process's address space at what it holds now plus ``headroom`` of the free memory.

    A step that needs more then fails inside torch's allocator with an exception the caller can catch, instead
    of waking the kernel's OOM killer, which on a shared machine may kill someone else's process. No-op on CUDA
    (torch raises ``torch.cuda.OutOfMemoryError`` there) and where limits cannot be set.
    """
    if device.type != "cpu":
        yield
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        statm = Path("/proc/self/statm").read_text().split()
        virtual = int(statm[0]) * resource.getpagesize()
        free = available_memory()
        if not free:
            raise OSError("no MemAvailable")
        cap = virtual + int(headroom * free)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


# --------------------------------------------------------------------------------------------- our SimCLR config


def simclr_config(*, width: float, batch_size: int, device: torch.device, seed: int, blur: float, lr: float,
                  temperature: float, epochs: int = 1, data: str = DEFAULT_DATA, head: str = "mlp_bn"
                  ) -> dict[str, Any]:
    """Our simclr preset with a ResNet-18 and the head lightly's docs use, scaled with the width.

    lightly's CIFAR example uses SimCLRProjectionHead(512, 512, 128) on a ResNet-18; at width w both heads are
    (512w -> 512w -> 128w), and our ``mlp_bn`` head has its layers (a BatchNorm after the last one too; the
    preset's ``mlp`` has none there). Adam, weight decay 1e-6 (the preset's), no warm-up: the cosine schedule from
    step 0. Colour-jitter strength 1.0, lightly's ``cj_strength`` default (the simclr pipeline's own default at
    32 px is SimCLR's CIFAR value 0.5), so both sides jitter alike.
    """
    return {
        "method": "simclr", "encoder": "resnet18", "width": width, "batch_size": batch_size, "head": head,
        "proj_hidden": scaled(512, width), "proj_dim": scaled(128, width), "temperature": temperature,
        "optimizer": "adam", "lr": lr, "weight_decay": 1e-6, "warmup_epochs": 0, "epochs": epochs,
        "blur_prob": blur, "jitter_strength": 1.0, "device": str(device), "seed": seed, "data": data,
    }


# -------------------------------------------------------------------------------------------------------- lightly


def import_lightly() -> Any:
    try:
        import lightly  # noqa: F401
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(f"this benchmark needs lightly: pip install -e '.[bench]' ({error})") from None
    return NTXentLoss, SimCLRProjectionHead, SimCLRTransform


class PooledEncoder(nn.Module):
    """A csl encoder returning only its pooled vector: a torchvision-style backbone for lightly's model."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).vector


class LightlySimCLR(nn.Module):
    """lightly's documented SimCLR model: ``projection_head(backbone(x))``, one view at a time."""

    def __init__(self, width: float) -> None:
        super().__init__()
        _, SimCLRProjectionHead, _ = import_lightly()
        self.backbone = PooledEncoder(ENCODER.build("resnet18", width=width))
        dim = self.backbone.encoder.vector_dim
        self.projection_head = SimCLRProjectionHead(dim, scaled(512, width), scaled(128, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    def representation(self, x: Tensor) -> Tensor:
        """What ``csl.evaluate.extract_features`` reads: the backbone's pooled vector."""
        return self.backbone(x)


class PILDataset(torch.utils.data.Dataset):
    """Decoded images as PIL images (what torchvision's CIFAR10 hands a transform), with their labels."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Any], Any]) -> None:
        from PIL import Image

        array = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        self.images = [Image.fromarray(a) for a in array]
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), self.labels[index]


def lightly_loader(data: Any, *, mean: Sequence[float], std: Sequence[float], blur: float, batch_size: int,
                   workers: int, device: torch.device, seed: int, persistent: bool = False
                   ) -> torch.utils.data.DataLoader:
    """lightly's documented SimCLR data path: SimCLRTransform on PIL images in a shuffling DataLoader.

    input_size 32, blur probability ``blur`` (lightly's CIFAR example sets gaussian_blur=0.0), and the same
    normalisation as ours (the training set's mean and std, instead of lightly's ImageNet default).
    """
    _, _, SimCLRTransform = import_lightly()
    transform = SimCLRTransform(input_size=SIZE, gaussian_blur=blur,
                                normalize={"mean": list(mean), "std": list(std)})
    return torch.utils.data.DataLoader(
        PILDataset(data.images, data.labels, transform), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


class LightlyTrainer:
    """lightly's documented SimCLR loop, with the network settings its documentation gives or those of ours.

    Per step: two views from the DataLoader to the device, ``z0 = model(x0)``, ``z1 = model(x1)``,
    ``NTXentLoss(z0, z1)``, backward, Adam step. ``like(run, settings=...)`` picks the network settings:

    - ``documented``: what lightly's SimCLR examples run: float32, the default memory format, ``torch.optim.Adam``
      without ``fused``: lightly's SimCLR as its documentation sets it up;
    - ``ours``: our trainer's settings for ``run`` (``run.autocast``: bf16 where the device computes it natively,
      ``run.channels_last``, Adam fused where ours is, on CUDA), so both networks do the same arithmetic and the
      comparison is of the data paths alone.
    """

    SETTINGS = ("documented", "ours")

    def __init__(self, model: LightlySimCLR, *, device: torch.device, lr: float, temperature: float,
                 autocast: bool, channels_last: bool, fused: bool, weight_decay: float = 1e-6) -> None:
        NTXentLoss, _, _ = import_lightly()
        self.device = device
        self.autocast = autocast
        self.channels_last = channels_last
        self.model = model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.criterion = NTXentLoss(temperature=temperature)
        self.lr = lr
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay,
                                          fused=fused or None)

    @classmethod
    def like(cls, run: Any, width: float, *, lr: float, temperature: float, settings: str = "documented"
             ) -> LightlyTrainer:
        """lightly's SimCLR on ``run``'s device with the ``settings`` network settings (see the class), its backbone
        starting from our weights."""
        if settings not in cls.SETTINGS:
            raise ValueError(f"settings must be one of {cls.SETTINGS}, got {settings!r}")
        ours = settings == "ours"
        peer = cls(LightlySimCLR(width), device=run.device, lr=lr, temperature=temperature,
                   autocast=ours and run.autocast, channels_last=ours and run.channels_last,
                   fused=ours and run.device.type == "cuda")
        peer.model.backbone.encoder.load_state_dict(run.model.encoder.state_dict())
        return peer

    def set_lr_factor(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    def step(self, batch: Any) -> Tensor:
        (x0, x1), _ = batch
        x0 = x0.to(self.device, non_blocking=True)
        x1 = x1.to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            x1 = x1.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            z0 = self.model(x0)
            z1 = self.model(x1)
        loss = self.criterion(z0.float(), z1.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


def close_iterator(iterator: Any) -> None:
    """Stop a DataLoader iterator's workers now (not whenever the garbage collector gets to it)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def loader_block(loader: torch.utils.data.DataLoader, step: Callable[[Any], Any], device: torch.device) -> Block:
    """A block over a fresh iterator: workers start and fill their queue during the warm-up, then run steady.

    A DataLoader asks its workers for one new batch each time one is taken, so once the queue is full every
    timed step pays for producing exactly one batch, as in a long epoch. The workers are stopped at the end of
    the block, so they take no CPU from the other side's blocks.
    """

    def block(warmup: int, steps: int) -> float:
        if warmup + steps > len(loader):
            raise ValueError(f"a block needs {warmup + steps} batches but an epoch has {len(loader)}: "
                             f"raise --limit to at least {(warmup + steps) * loader.batch_size}")
        iterator = iter(loader)
        try:
            for _ in range(warmup):
                step(next(iterator))

            def run() -> None:
                for _ in range(steps):
                    step(next(iterator))

            return timed(device, run)
        finally:
            close_iterator(iterator)

    return block


def run_block(run: Any, batches: Iterator[tuple[Tensor, Tensor]]) -> Block:
    """A block of ``run.train_step`` on uint8 batches already on the device."""

    def block(warmup: int, steps: int) -> float:
        for _ in range(warmup):
            run.train_step(*next(batches))

        def go() -> None:
            for _ in range(steps):
                run.train_step(*next(batches))

        return timed(run.device, go)

    return block


def ours_and_lightly(config: dict[str, Any], train: Any, test: Any, args: Any, width: float, device: torch.device,
                     settings: Sequence[str] = ("documented",)) -> tuple[Any, dict[str, Any], Any]:
    """Our ``Run`` and lightly's documented SimCLR set up alike: same network weights, data and recipe.

    ``config`` takes ``args.amp`` and ``args.channels_last`` (our trainer's options). Returns (ours, one lightly
    trainer per name in ``settings``, lightly's DataLoader); every peer starts from our initial weights.
    """
    from csl.train import Run

    ours = Run({**config, "amp": args.amp, "channels_last": args.channels_last}, data=(train, test))
    peers = {}
    for name in settings:
        torch.manual_seed(args.seed)
        peers[name] = LightlyTrainer.like(ours, width, lr=args.lr, temperature=args.temperature, settings=name)
    mean, std = ours.train_data.mean_std()
    loader = lightly_loader(train, mean=mean, std=std, blur=args.blur, batch_size=args.batch_size,
                            workers=args.workers, device=device, seed=args.seed)
    return ours, peers, loader

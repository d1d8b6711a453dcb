"""Helpers shared by the side-by-side benchmarks (throughput, bench_peer, bench_step, bench_quality, bench_reproduce).

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
import copy  # noqa: E402
import functools  # noqa: E402
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
    from csl.train import native_bf16

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    amx = "AMX: bf16 autocast pays" if native_bf16(device) else "no AMX: float32"
    return (f"CPU {cpu_model()} ({amx}), {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={policy} "
            f"(torch {torch.__version__})")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s first "model name"), and how many cores this process may use."""
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


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


# ------------------------------------------------------------------------------------------- our method configs


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


def byol_config(*, width: float, batch_size: int, device: torch.device, seed: int, blur: float,
                lr: float | None = None, epochs: int = 1, data: str = DEFAULT_DATA) -> dict[str, Any]:
    """Our byol preset on lightly's documented CIFAR-10 BYOL set-up, scaled with the width.

    lightly's BYOL example and CIFAR-10 benchmark: BYOLProjectionHead(512, 1024, 256) and BYOLPredictionHead(256,
    1024, 256) on a ResNet-18 (ours: the preset's ``mlp`` head and predictor, the same layers), SGD lr 0.06 x
    batch / 128 with momentum 0.9 and weight decay 5e-4 (instead of the preset's ImageNet LARS), the target's
    momentum from 0.996 to 1 on a cosine (the preset's), both views blurred with probability ``blur`` (lightly's
    CIFAR setting disables blur) and the second solarized with 0.2 (the preset's, BYOLView2Transform's).
    """
    return {
        "method": "byol", "encoder": "resnet18", "width": width, "batch_size": batch_size,
        "proj_hidden": scaled(1024, width), "proj_dim": scaled(256, width), "pred_hidden": scaled(1024, width),
        "optimizer": "sgd", "lr": lr if lr is not None else 0.06 * batch_size / 128, "sgd_momentum": 0.9,
        "weight_decay": 5e-4, "warmup_epochs": 0, "epochs": epochs, "blur_prob": (blur, blur),
        "device": str(device), "seed": seed, "data": data,
    }


def moco_config(*, width: float, batch_size: int, device: torch.device, seed: int, blur: float,
                lr: float | None = None, temperature: float = 0.1, epochs: int = 1, data: str = DEFAULT_DATA
                ) -> dict[str, Any]:
    """Our moco_v2 preset (one query -> key loss, queue-only negatives, Linear-ReLU-Linear head, 8 batch-norm
    splits with the keys shuffled) on MoCo's CIFAR-10 demo recipe, scaled with the width.

    facebookresearch/moco ``colab/moco_cifar10_demo.ipynb`` on a ResNet-18: queue 4,096, key momentum 0.99,
    temperature 0.1, SGD lr 0.06 x batch / 512 with momentum 0.9 and weight decay 5e-4, cosine, ``--bn-splits 8``;
    lightly's CIFAR-10 MoCo benchmark agrees on all but the learning rate (0.06 x batch / 128). The head is MoCo
    v2's at the encoder's width, 512w -> 512w -> 128w as lightly's MoCoProjectionHead(512, 512, 128).
    """
    return {
        "method": "moco_v2", "encoder": "resnet18", "width": width, "batch_size": batch_size,
        "proj_dim": scaled(128, width), "temperature": temperature, "queue_size": 4096, "bn_splits": 8,
        "target_momentum": 0.99, "target_momentum_final": 0.99,
        "optimizer": "sgd", "lr": lr if lr is not None else 0.06 * batch_size / 512, "sgd_momentum": 0.9,
        "weight_decay": 5e-4, "warmup_epochs": 0, "epochs": epochs, "blur_prob": blur,
        "device": str(device), "seed": seed, "data": data,
    }


# -------------------------------------------------------------------------------------------------------- lightly

PEER_METHODS = ("simclr", "byol", "moco_v2")


def import_lightly() -> Any:
    """lightly's package, or a clear exit saying how to install it."""
    try:
        import lightly
        import lightly.loss
        import lightly.models.batchnorm
        import lightly.models.modules
        import lightly.models.utils
        import lightly.transforms
        import lightly.utils.scheduler
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(f"this benchmark needs lightly: pip install -e '.[bench]' ({error})") from None
    return lightly


class PooledEncoder(nn.Module):
    """A csl encoder returning only its pooled vector: a torchvision-style backbone for lightly's model."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).vector


def both(network: Callable[[Tensor], Tensor], x0: Tensor, x1: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
    """A network's outputs for two views: one pass each (lightly's examples), or one pass over both (``joint``: our
    ``encode_views: joint``, SimCLR's batch norm over the 2N views), for the side given our network settings."""
    if not joint:
        return network(x0), network(x1)
    out0, out1 = network(torch.cat([x0, x1])).chunk(2)
    return out0, out1


class LightlySimCLR(nn.Module):
    """lightly's documented SimCLR model: ``projection_head(backbone(x))``, one view at a time, NTXentLoss."""

    joint = False  # both views in one pass (LightlyTrainer.like with our network settings and ours joint)

    def __init__(self, encoder: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__()
        lightly = import_lightly()
        self.backbone = PooledEncoder(encoder)
        self.projection_head = lightly.models.modules.SimCLRProjectionHead(
            encoder.vector_dim, config["proj_hidden"], config["proj_dim"])
        self.criterion = lightly.loss.NTXentLoss(temperature=config["temperature"])

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    def representation(self, x: Tensor) -> Tensor:
        """What ``csl.evaluate.extract_features`` reads: the backbone's pooled vector."""
        return self.backbone(x)

    def loss(self, x0: Tensor, x1: Tensor, *, step: int, total_steps: int, cast: Callable[[], Any]) -> Tensor:
        with cast():
            z0, z1 = both(self, x0, x1, self.joint)
        return self.criterion(z0.float(), z1.float())


class LightlyBYOL(nn.Module):
    """lightly's documented BYOL (``examples/pytorch/byol.py``): online backbone, projection and prediction heads,
    momentum copies of backbone and projection head updated by ``update_momentum`` at the start of each step with
    ``cosine_schedule(step, total, base, 1)``, ``NegativeCosineSimilarity`` in both directions averaged.

    lightly's criterion is −cos; BYOL's (and ours) 2 − 2cos: the same up to a constant and a factor 2, which lightly's
    own ImageNet BYOL benchmark puts in (``2 * criterion``), so it is put in here too and both sides take the
    same gradients.
    """

    joint = False  # as LightlySimCLR's

    def __init__(self, encoder: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__()
        lightly = import_lightly()
        heads, utils = lightly.models.modules, lightly.models.utils
        self.backbone = PooledEncoder(encoder)
        self.projection_head = heads.BYOLProjectionHead(encoder.vector_dim, config["proj_hidden"], config["proj_dim"])
        self.prediction_head = heads.BYOLPredictionHead(config["proj_dim"], config["pred_hidden"], config["proj_dim"])
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = lightly.loss.NegativeCosineSimilarity()
        self.momentum = (config["target_momentum"], config["target_momentum_final"])
        self._update, self._schedule = utils.update_momentum, lightly.utils.scheduler.cosine_schedule

    def forward(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def representation(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def loss(self, x0: Tensor, x1: Tensor, *, step: int, total_steps: int, cast: Callable[[], Any]) -> Tensor:
        m = self._schedule(step, total_steps, *self.momentum)
        self._update(self.backbone, self.backbone_momentum, m=m)
        self._update(self.projection_head, self.projection_head_momentum, m=m)
        with cast():
            p0, p1 = both(self, x0, x1, self.joint)
            z0, z1 = both(self.forward_momentum, x0, x1, self.joint)
        return 2 * 0.5 * (self.criterion(p0.float(), z1.float()) + self.criterion(p1.float(), z0.float()))


class LightlyMoCo(nn.Module):
    """lightly's documented MoCo (``examples/pytorch/moco.py``, the CIFAR-10 benchmark's ``MocoModel``): backbone
    with lightly's ``SplitBatchNorm`` (``num_splits`` 8), ``MoCoProjectionHead``, momentum copies updated by
    ``update_momentum`` at the start of each step, the key batch through ``batch_shuffle``/``batch_unshuffle``,
    and ``NTXentLoss`` with a memory bank of (K, dim) as the queue. One query -> key direction per step, as MoCo
    v2 (the CIFAR benchmark symmetrises; the MoCo v2 code does not)."""

    def __init__(self, encoder: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__()
        lightly = import_lightly()
        utils = lightly.models.utils
        self.backbone = PooledEncoder(encoder)
        dim = encoder.vector_dim
        self.projection_head = lightly.models.modules.MoCoProjectionHead(dim, dim, config["proj_dim"])
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = lightly.loss.NTXentLoss(temperature=config["temperature"],
                                                 memory_bank_size=(config["queue_size"], config["proj_dim"]))
        self.momentum = config["target_momentum"]
        self._update, self._shuffle, self._unshuffle = utils.update_momentum, utils.batch_shuffle, utils.batch_unshuffle

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        x, shuffle = self._shuffle(x)
        key = self.projection_head_momentum(self.backbone_momentum(x))
        return self._unshuffle(key, shuffle).detach()

    def representation(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def loss(self, x0: Tensor, x1: Tensor, *, step: int, total_steps: int, cast: Callable[[], Any]) -> Tensor:
        self._update(self.backbone, self.backbone_momentum, m=self.momentum)
        self._update(self.projection_head, self.projection_head_momentum, m=self.momentum)
        with cast():
            query = self(x0)
            key = self.forward_momentum(x1)
        return self.criterion(query.float(), key.float())


def lightly_encoder(run: Any) -> nn.Module:
    """A copy of ``run``'s initial encoder for lightly's side: the same network and weights. Where ours splits
    batch norm, lightly's own ``SplitBatchNorm`` (what its CIFAR-10 MoCo benchmark builds) takes our layers' place;
    it keeps per-split running statistics, so only the weights are copied (the running statistics start at their
    defaults on both sides)."""
    from csl.encoders.resnet import build_resnet

    encoder = copy.deepcopy(run.model.encoder)
    splits = getattr(encoder, "bn_splits", 1)
    if splits == 1:
        return encoder
    split_norm = import_lightly().models.batchnorm.SplitBatchNorm
    depth = int(run.config["encoder"].removeprefix("resnet"))
    peer = build_resnet(run.config["encoder"], depth, width=run.config["width"], stem=run.config.get("stem", "cifar"),
                        zero_init_residual=True, norm_layer=functools.partial(split_norm, num_splits=splits))
    weights = {k: v for k, v in encoder.state_dict().items() if not k.endswith(STATISTICS)}
    missing, unexpected = peer.load_state_dict(weights, strict=False)
    if unexpected or not all(k.endswith(STATISTICS) for k in missing):
        raise RuntimeError(f"lightly's encoder differs from ours: missing {missing}, unexpected {unexpected}")
    return peer


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
LIGHTLY_MODELS: dict[str, Callable[[nn.Module, Mapping[str, Any]], nn.Module]] = {
    "simclr": LightlySimCLR, "byol": LightlyBYOL, "moco_v2": LightlyMoCo,
}


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


def lightly_transform(method: str, *, mean: Sequence[float], std: Sequence[float], blur: float) -> Any:
    """lightly's documented two-view transform of ``method`` at 32 px, blur probability ``blur`` for both views
    (lightly's CIFAR examples set gaussian_blur=0.0), normalised like ours (the training set's mean and std,
    instead of lightly's ImageNet default)."""
    transforms = import_lightly().transforms
    normalize = {"mean": list(mean), "std": list(std)}
    if method == "simclr":
        return transforms.SimCLRTransform(input_size=SIZE, gaussian_blur=blur, normalize=normalize)
    if method == "byol":
        return transforms.BYOLTransform(
            view_1_transform=transforms.BYOLView1Transform(input_size=SIZE, gaussian_blur=blur, normalize=normalize),
            view_2_transform=transforms.BYOLView2Transform(input_size=SIZE, gaussian_blur=blur, normalize=normalize))
    if method == "moco_v2":
        return transforms.MoCoV2Transform(input_size=SIZE, gaussian_blur=blur, normalize=normalize)
    raise ValueError(f"no lightly peer for method '{method}'; choose one of {', '.join(PEER_METHODS)}")


def lightly_loader(data: Any, *, mean: Sequence[float], std: Sequence[float], blur: float, batch_size: int,
                   workers: int, device: torch.device, seed: int, persistent: bool = False, method: str = "simclr"
                   ) -> torch.utils.data.DataLoader:
    """lightly's documented data path: its transform of ``method`` on PIL images in a shuffling DataLoader."""
    transform = lightly_transform(method, mean=mean, std=std, blur=blur)
    return torch.utils.data.DataLoader(
        PILDataset(data.images, data.labels, transform), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


class LightlyTrainer:
    """lightly's documented loop for a method, with the network settings its documentation gives or those of ours.

    Per step: two views from the DataLoader to the device, the model's documented loss (``LightlySimCLR.loss``
    etc.: momentum updates first where the method has them), backward, optimiser step. The optimiser and its
    hyperparameters are our run's (``torch.optim.Adam`` or ``SGD`` with the same learning rate, weight decay and
    momentum), the learning rate set per step by the caller. ``like(run, settings=...)`` picks the network
    settings:

    - ``documented``: what lightly's examples run: float32, the default memory format, the optimiser without
      ``fused``: lightly as its documentation sets it up;
    - ``ours``: our trainer's settings for ``run`` (``run.autocast``: bf16 where the device computes it natively,
      ``run.channels_last``, the optimiser fused where ours is, on CUDA, both views in one pass where ours encodes
      them jointly), so both networks do the same arithmetic and the comparison is of the data paths alone.
    """

    SETTINGS = ("documented", "ours")

    def __init__(self, model: nn.Module, *, device: torch.device, optimizer: str, lr: float, weight_decay: float,
                 sgd_momentum: float, autocast: bool, channels_last: bool, fused: bool, total_steps: int) -> None:
        self.device = device
        self.autocast = autocast
        self.channels_last = channels_last
        # The encoder is a copy of ours, whose weights our trainer made channels_last: a convolution takes that
        # layout when its input *or* its weight has it, so "the default memory format" must be set back here.
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.lr = lr
        params = [p for p in self.model.parameters() if p.requires_grad]
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay,
                                                                     fused=fused or None)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=sgd_momentum, weight_decay=weight_decay,
                                             fused=fused or None)
        else:
            raise ValueError(f"lightly's side takes adam or sgd, not {optimizer!r}")
        self.steps = 0
        self.total_steps = total_steps

    @classmethod
    def like(cls, run: Any, width: float | None = None, *, settings: str = "documented") -> LightlyTrainer:
        """lightly's model of ``run``'s method on ``run``'s device, with ``run``'s recipe (``run.config``) and the
        ``settings`` network settings (see the class), its encoder starting from our weights. ``width`` is
        ``run.config['width']`` (kept for callers that pass it)."""
        if settings not in cls.SETTINGS:
            raise ValueError(f"settings must be one of {cls.SETTINGS}, got {settings!r}")
        config = run.config
        if width is not None and width != config["width"]:
            raise ValueError(f"width {width} is not the run's ({config['width']})")
        if config["method"] not in LIGHTLY_MODELS:
            raise ValueError(f"no lightly peer for method '{config['method']}'; choose one of "
                             f"{', '.join(PEER_METHODS)}")
        ours = settings == "ours"
        model = LIGHTLY_MODELS[config["method"]](lightly_encoder(run), config)
        if hasattr(model, "joint"):  # MoCo's query and key pass through different networks: nothing to join
            model.joint = ours and config["encode_views"] == "joint"
        return cls(model, device=run.device, optimizer=config["optimizer"], lr=config["lr"],
                   weight_decay=config["weight_decay"], sgd_momentum=config["sgd_momentum"],
                   autocast=ours and run.autocast, channels_last=ours and run.channels_last,
                   fused=ours and run.device.type == "cuda", total_steps=run.total_steps)

    def set_lr_factor(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    def _cast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def step(self, batch: Any) -> Tensor:
        (x0, x1), _ = batch
        x0 = x0.to(self.device, non_blocking=True)
        x1 = x1.to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            x1 = x1.contiguous(memory_format=torch.channels_last)
        loss = self.model.loss(x0, x1, step=self.steps, total_steps=self.total_steps, cast=self._cast)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1
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
    """Our ``Run`` of ``config`` (simclr, byol or moco_v2) and lightly's documented implementation of its method
    set up alike: same network and initial encoder weights, data, recipe (lightly's side reads ``run.config``).

    ``config`` takes ``args.amp`` and ``args.channels_last`` (our trainer's options). Returns (ours, one lightly
    trainer per name in ``settings``, lightly's DataLoader); every peer starts from our initial weights.
    """
    from csl.train import Run

    ours = Run({**config, "amp": args.amp, "channels_last": args.channels_last}, data=(train, test))
    peers = {}
    for name in settings:
        torch.manual_seed(args.seed)
        peers[name] = LightlyTrainer.like(ours, width, settings=name)
    mean, std = ours.train_data.mean_std()
    loader = lightly_loader(train, mean=mean, std=std, blur=args.blur, batch_size=ours.config["batch_size"],
                            workers=args.workers, device=device, seed=args.seed, method=ours.config["method"])
    return ours, peers, loader

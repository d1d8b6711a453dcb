"""The CUDA paths: bf16 autocast, fused optimisers, channels_last, device generators, compile, resume on a GPU.

Skipped without a GPU (CI has none); run on a lent GPU machine with ``python -m pytest tests/test_cuda.py``. The
references are the same computations on the CPU in float32: a GPU path must compute the same function.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from csl.config import resolve
from csl.evaluate import knn_accuracy
from csl.model import build_model
from csl.optim import build_optimizer
from csl.presets import PRESETS
from csl.train import Run
from tests.helpers import cifar_mini, random_images, tiny  # noqa: F401  (cifar_mini is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Switch off TF32 (cuDNN uses it for float32 convolutions by default): a float32 reference needs float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm().clamp(min=1e-12))


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_trains_and_evaluates_on_cuda(method: str, cifar_mini) -> None:
    """Two epochs on the GPU with the trainer's CUDA defaults (bf16, channels_last, fused optimiser)."""
    run = Run(tiny(method=method, device="cuda", epochs=2), data=cifar_mini)
    assert run.autocast and run.channels_last and run.train_data.images.is_cuda
    losses = [run.train_epoch()["ssl_loss"] for _ in range(2)]
    metrics = run.evaluate()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert 0.0 <= metrics["knn_acc"] <= 1.0 and 0.0 <= metrics["probe_acc"] <= 1.0


@pytest.mark.parametrize("method", ["simclr", "byol", "moco_v2", "amdim", "cpc_v2", "yadim"])
def test_cuda_loss_matches_cpu(method: str) -> None:
    """The same weights and views give the CPU's float32 loss: to float32 rounding without autocast, and to bf16's
    precision with it. AMDIM compares without its 5:5 term, whose random anchor locations come from each device's
    own generator."""
    torch.manual_seed(0)
    cfg = resolve(tiny(method=method, **({"comparisons": "1:5, 1:7"} if method == "amdim" else {})))
    pipeline, model = build_model(cfg, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views = pipeline(random_images(16), torch.Generator().manual_seed(0))
    model.train()
    # copies before any forward pass: MoCo's forward enqueues its keys, which would change the next loss
    gpu_plain, gpu_mixed = copy.deepcopy(model).cuda(), copy.deepcopy(model).cuda()
    reference, _ = model(*views)
    gpu_views = [v.cuda() for v in views]
    with full_float32():
        plain, _ = gpu_plain(*gpu_views)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed, _ = gpu_mixed(*gpu_views)
    assert relative_error(plain, reference) < 1e-3
    assert relative_error(mixed, reference) < 5e-2


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimisers_match_the_for_loop(name: str) -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).cuda()
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    optimisers = [build_optimizer(name, net, lr=1e-2, weight_decay=1e-4, sgd_momentum=0.9, fused=fused)
                  for net, fused in zip(nets, (False, True))]
    x = torch.randn(32, 8, device="cuda")
    for _ in range(5):
        for net, opt in zip(nets, optimisers):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert relative_error(b, a) < 1e-5


def test_cuda_generator_draws_views_on_the_device() -> None:
    """Augmentation parameters come from a CUDA generator: no host copy, and the same seed gives the same views."""
    pipeline, _ = build_model(resolve(tiny(method="simclr")), image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = random_images(32).cuda()
    first = pipeline(images, torch.Generator(device="cuda").manual_seed(3))
    again = pipeline(images, torch.Generator(device="cuda").manual_seed(3))
    assert all(v.is_cuda for v in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_cuda_checkpoint_resume_continues_the_same_run(tmp_path: Path, cifar_mini) -> None:
    """Resume on the GPU restores the CUDA generator too: the next augmentation draw and step are the same.

    cuDNN's backward kernels may sum in any order, so the next loss is compared to rounding, not bit for bit."""
    config = tiny(method="moco_v2", device="cuda", epochs=3)
    straight = Run(config, data=cifar_mini)
    straight.train_epoch()
    straight.save(tmp_path / "ckpt")
    batch = next(iter(straight.train_data.batches(16, straight.generator)))
    expected = float(straight.train_step(*batch))
    resumed = Run(config, data=cifar_mini)
    resumed.load(tmp_path / "ckpt")
    assert torch.equal(resumed.generator.get_state(), torch.load(tmp_path / "ckpt" / "state.pt")["generator"])
    batch = next(iter(resumed.train_data.batches(16, resumed.generator)))
    assert abs(float(resumed.train_step(*batch)) - expected) < 1e-3 * max(1.0, abs(expected))


def test_compiled_model_gives_the_eager_loss(cifar_mini) -> None:
    eager = Run(tiny(method="simclr", device="cuda", amp=False), data=cifar_mini)
    compiled = Run(tiny(method="simclr", device="cuda", amp=False, compile=True), data=cifar_mini)
    compiled.model.load_state_dict(eager.model.state_dict())
    batch = next(iter(eager.train_data.batches(16, torch.Generator(device="cuda").manual_seed(0))))
    views = eager.pipeline(batch[0], torch.Generator(device="cuda").manual_seed(1))
    eager_loss, _ = eager.forward(*views)
    compiled_loss, _ = compiled.forward(*views)
    assert relative_error(compiled_loss.detach(), eager_loss.detach()) < 1e-4
    compiled.train_epoch()  # the compiled backward and optimiser step run too


@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_separate_view_passes_train_on_cuda(method: str, cifar_mini) -> None:
    """encode_views=separate with the CUDA defaults (bf16, channels_last), eager and compiled."""
    for compile_model in (False, True):
        run = Run(tiny(method=method, device="cuda", encode_views="separate", compile=compile_model), data=cifar_mini)
        assert run.autocast
        assert torch.isfinite(torch.tensor(run.train_epoch()["ssl_loss"]))


@pytest.mark.parametrize("method", ["simclr", "byol", "amdim", "cpc_v2"])
def test_compiled_augmentation_gives_the_eager_views(method: str) -> None:
    """The compiled pipeline draws the same parameters and computes the same views, to float32 reassociation."""
    pipeline, _ = build_model(resolve(tiny(method=method)), image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = random_images(64).cuda()
    eager = pipeline(images, torch.Generator(device="cuda").manual_seed(0))
    pipeline.compile(torch.device("cuda"))
    compiled = pipeline(images, torch.Generator(device="cuda").manual_seed(0))
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4


def test_knn_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    bank, bank_labels = torch.randn(500, 32, generator=g), torch.randint(0, 10, (500,), generator=g)
    query, query_labels = torch.randn(100, 32, generator=g), torch.randint(0, 10, (100,), generator=g)
    cpu = knn_accuracy(bank, bank_labels, query, query_labels, k=20, num_classes=10)
    gpu = knn_accuracy(bank.cuda(), bank_labels.cuda(), query.cuda(), query_labels.cuda(), k=20, num_classes=10)
    assert cpu == gpu


@pytest.mark.parametrize("image_size", [None, 96])
def test_streamed_parquet_decodes_jpegs_on_the_gpu(image_size: int | None) -> None:
    """A streamed parquet set on CUDA decodes its JPEG batches there (nvJPEG) and resizes them there: the same
    images and labels, in the same order, as the CPU workers' libjpeg-turbo decoding, to a few levels of IDCT and
    upsampling rounding; a shard reads its slice."""
    from csl.data import ParquetStream, load

    streamed = load("cifar10-mini", limit=128, stream="on", image_size=image_size, workers=1)
    assert isinstance(streamed, ParquetStream)
    on_gpu = streamed.to("cuda")
    assert on_gpu.gpu_decode and not streamed.gpu_decode
    cpu_batches = list(streamed.batches(32, torch.Generator().manual_seed(4)))
    gpu_batches = list(on_gpu.batches(32, torch.Generator().manual_seed(4)))
    assert len(cpu_batches) == len(gpu_batches) == 4
    side = image_size or 32
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(cpu_batches, gpu_batches):
        assert x_gpu.is_cuda and x_gpu.dtype == torch.uint8 and x_gpu.shape == (32, 3, side, side)
        assert torch.equal(y_gpu.cpu(), y_cpu)
        difference = (x_gpu.cpu().int() - x_cpu.int()).abs().float()
        assert float(difference.mean()) < 1.0 and float(difference.max()) <= 48
    shard = list(on_gpu.batches(32, torch.Generator().manual_seed(4), shard=(1, 2)))
    for (x_shard, y_shard), (x_whole, y_whole) in zip(shard, gpu_batches, strict=True):  # nvJPEG may pick another
        assert torch.equal(y_shard, y_whole[16:])  # backend for a smaller batch: the pixels to its rounding
        assert float((x_shard.int() - x_whole[16:].int()).abs().float().mean()) < 1.0
    run = Run(tiny(method="simclr", device="cuda", data_stream="on", label_free_samples=0))
    assert run.train_data.gpu_decode and torch.isfinite(torch.tensor(run.train_epoch()["ssl_loss"]))

"""Training behaviour: exact resume from a checkpoint, learning beats random init, divergence is reported."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import csl  # noqa: F401
from csl.config import resolve
from csl.data import load
from csl.evaluate import extract_features, knn_accuracy
from csl.model import build_model
from csl.train import Diverged, Run, native_bf16, train
from tests.helpers import cifar_mini, random_images, tiny  # noqa: F401  (cifar_mini is a fixture)

AMX = native_bf16(torch.device("cpu"))


def next_step_loss(run: Run) -> float:
    images, labels = next(iter(run.train_data.batches(run.config["batch_size"], run.generator)))
    return float(run.train_step(images, labels))


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "amdim"])
def test_checkpoint_resume_gives_the_same_next_step(method: str, tmp_path: Path, cifar_mini) -> None:
    """save → load → continue equals not stopping: model, optimiser, EMA target, queue and every RNG restored."""
    config = tiny(method=method, epochs=3)
    straight = Run(config, data=cifar_mini)
    straight.train_epoch()
    straight.save(tmp_path / "ckpt")
    expected = next_step_loss(straight)

    resumed = Run(config, data=cifar_mini)
    resumed.load(tmp_path / "ckpt")
    assert resumed.epoch == 1 and resumed.step == straight.steps_per_epoch
    assert next_step_loss(resumed) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_train_reports_each_epoch_and_resumes(tmp_path: Path, cifar_mini) -> None:
    seen: list[tuple[int, dict]] = []

    def callback(epoch: int, metrics: dict, save) -> None:
        seen.append((epoch, metrics))
        save(tmp_path / f"epoch{epoch}")

    final = train(tiny(method="simclr", encoder="resnet18", epochs=2), callback=callback, data=cifar_mini)
    assert [e for e, _ in seen] == [1, 2]
    for key in ("ssl_loss", "knn_acc", "probe_acc", "images_per_s", "epoch_time"):
        assert key in final
    assert 0.0 <= final["knn_acc"] <= 1.0
    seen.clear()
    train(tiny(method="simclr", encoder="resnet18", epochs=2), callback=callback, resume_from=tmp_path / "epoch1",
          data=cifar_mini)
    assert [e for e, _ in seen] == [2]


def test_divergence_is_raised_not_hidden(cifar_mini) -> None:
    config = tiny(method="simclr", encoder="resnet18", similarity="dot", optimizer="sgd", lr=1e8, epochs=2)
    with pytest.raises(Diverged):
        train(config, data=cifar_mini)


def test_simclr_learns_beyond_random_init() -> None:
    """A short SimCLR run on the embedded data beats the same encoder at random initialisation on kNN accuracy."""
    data = (load("cifar10-mini", split="train", limit=2000), load("cifar10-mini", split="test", limit=500))
    config = tiny(method="simclr", encoder="resnet18", width=0.125, batch_size=128, epochs=4, lr=2e-3,
                  proj_dim=64, proj_hidden=128, temperature=0.2, knn_k=20)

    def knn(run: Run) -> float:
        kwargs = {"batch_size": 256, "device": run.device, "autocast": False}
        tx, ty = extract_features(run.model, run.pipeline, run.train_data, **kwargs)
        vx, vy = extract_features(run.model, run.pipeline, run.test_data, **kwargs)
        return knn_accuracy(tx, ty, vx, vy, k=20, temperature=0.1, num_classes=10)

    run = Run(config, data=data)
    at_init = knn(run)
    for _ in range(config["epochs"]):
        run.train_epoch()
    trained = knn(run)
    print(f"kNN at init {at_init:.3f}, after training {trained:.3f}")
    assert trained > at_init + 0.02, f"kNN accuracy {trained:.3f} after training vs {at_init:.3f} at init"


@pytest.mark.parametrize(("amx", "amp", "expected"), [(True, True, True), (False, True, False), (True, False, False)])
def test_amp_takes_bf16_only_on_cpus_that_compute_it(amx: bool, amp: bool, expected: bool, monkeypatch,
                                                     cifar_mini) -> None:
    """bf16 convolutions without AMX are emulated and slower than float32, so ``amp`` must not switch them on
    there. The processor check is the one thing replaced here: this machine has AMX or lacks it, not both."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    run = Run(tiny(method="simclr", amp=amp), data=cifar_mini)
    assert run.autocast is expected
    assert torch.isfinite(run.train_step(*next(iter(run.train_data.batches(16, run.generator)))))


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX: amp leaves it in float32")
@pytest.mark.parametrize("method", ["simclr", "byol", "moco_v2", "amdim", "cpc_v2", "yadim"])
def test_cpu_bf16_loss_matches_float32(method: str) -> None:
    """What ``amp`` does on an AMX CPU: the same weights and views give the float32 loss to bf16's precision.
    AMDIM compares without its 5:5 term, whose random anchor locations are drawn anew on each call."""
    torch.manual_seed(0)
    cfg = resolve(tiny(method=method, **({"comparisons": "1:5, 1:7"} if method == "amdim" else {})))
    pipeline, model = build_model(cfg, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views = pipeline(random_images(16), torch.Generator().manual_seed(0))
    model.train()
    mixed_model = copy.deepcopy(model)  # before any forward: MoCo's forward enqueues its keys
    reference, _ = model(*views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = mixed_model(*views)
    mixed, reference = mixed.detach().double(), reference.detach().double()
    error = float((mixed - reference).abs() / reference.abs().clamp(min=1e-12))
    assert error < 5e-2, f"{method}: bf16 loss {float(mixed):.5f} vs float32 {float(reference):.5f}"

"""The ``csl`` command: list every choice, train one configuration, and refuse bad input with a clear message."""

from __future__ import annotations

import pytest

from csl.cli import main, parse_value
from csl.registry import ASPECTS

TINY_ARGS = ["--encoder", "resnet18", "--width", "0.0625", "--epochs", "1", "--train_limit", "64", "--test_limit",
             "32", "--batch_size", "16", "--proj_hidden", "32", "--proj_dim", "16", "--warmup_epochs", "0"]


def test_list_prints_every_choice_and_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for aspect, registry in ASPECTS.items():
        assert f"{aspect}:" in out
        for name in registry.names():
            assert name in out
    for method in ("amdim", "cpc_v2", "simclr", "byol", "moco_v2", "yadim"):
        assert method in out


def test_train_prints_epoch_and_linear_eval(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["train", "--method", "simclr", "--checkpoint", str(tmp_path / "c"), "--linear-epochs", "2",
                 *TINY_ARGS]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "knn_acc=" in out and "linear evaluation" in out
    assert (tmp_path / "c" / "state.pt").exists()


def test_bad_option_and_bad_combination_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--method", "simclr", "--loss", "nope", *TINY_ARGS]) == 2
    assert "unknown loss 'nope'; choose one of" in capsys.readouterr().err
    assert main(["train", "--method", "byol", "--similarity", "dot", *TINY_ARGS]) == 2
    assert "needs similarity 'cosine'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("False", False), ("True", True), ("none", None), ("null", None), ("0.5", 0.5), ("3", 3),
    ("1:5, 5:5", "1:5, 5:5"), ("(1.0, 0.1)", (1.0, 0.1)), ("simclr", "simclr"),
])
def test_values_parse_as_literals_and_yaml_words(text: str, value: object) -> None:
    """'--compile false' must give False, not the string 'false' (which is truthy)."""
    assert parse_value(text) == value and type(parse_value(text)) is type(value)

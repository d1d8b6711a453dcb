"""``csl``: train one configuration, or list every registered choice and preset.

Every expected error (an unknown option or choice, a combination that cannot train, data that is missing or does
not decode, a damaged checkpoint) is one line ``csl: error: ...`` and exit code 2; ``--debug`` shows the
traceback instead. Ctrl-C or SIGTERM stops training after saving nothing new: the last epoch's ``--checkpoint``
stands, the command says how to continue from it, and exits with 130.
"""

from __future__ import annotations

import argparse
import ast
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from csl.best import MODES
from csl.config import TRAINER_DEFAULTS
from csl.errors import one_line
from csl.metrics import EPOCH_METRICS
from csl.presets import PRESETS
from csl.model import CombinationError
from csl.registry import ASPECTS, ChoiceError


# YAML's and most shells' spelling of booleans and null: "--compile true" must not become the (truthy) string
_WORDS: dict[str, Any] = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """Command-line values are Python literals where they parse as one (0.5, True, None), else strings."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--key value`` pairs after the known flags: any aspect or option can be overridden."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--") or i + 1 >= len(items):
            raise ChoiceError(f"expected '--option value', got '{' '.join(items[i:i + 2])}'")
        overrides[key[2:].replace("-", "_")] = parse_value(items[i + 1])
        i += 2
    return overrides


def print_choices() -> None:
    for aspect, registry in ASPECTS.items():
        print(f"{aspect}:")
        for name in registry.names():
            opts = ", ".join(f"{k}={v!r}" for k, v in registry.options(name).items())
            print(f"  {name:<14} {opts}")
    print("method presets:")
    for name, preset in PRESETS.items():
        print(f"  {name:<10} " + " ".join(f"{a}={preset[a]}" for a in ASPECTS))
    print("trainer options: " + ", ".join(f"{k}={v!r}" for k, v in TRAINER_DEFAULTS.items()))


def progress_line(epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in EPOCH_METRICS
                     if k in metrics)
    return f"epoch {epoch}/{epochs} {shown}"


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; the message says where it stood and how to continue."""


def _continue_note(args: argparse.Namespace, argv: list[str], run: Any) -> str:
    where = f"stopped in epoch {run.epoch + 1} of {run.config['epochs']}"
    if not args.checkpoint or not (Path(args.checkpoint) / "state.pt").is_file():
        return f"{where}; no --checkpoint was saved, so there is nothing to continue from"
    again = list(argv)
    if "--resume" in again:  # the folder it resumed from is replaced by the one it saved into
        i = again.index("--resume")
        del again[i : i + 2]
    command = "csl " + " ".join(again + ["--resume", str(args.checkpoint)])
    return f"{where}; {args.checkpoint} holds the last epoch that ended; continue: {command}"


def cmd_train(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from csl.train import Run

    config = parse_overrides(extra)
    if args.method:
        config["method"] = args.method
    run = Run(config)
    try:
        return _train(args, run)
    except KeyboardInterrupt:
        raise Interrupted(_continue_note(args, argv, run)) from None


BEST_DIR = "best"  # --checkpoint DIR/best/: the best epoch's state (csl.best), beside the latest in DIR
BEST_FILE = "best.json"  # in DIR/best/: {metric, mode, epoch, value}


def best_metric(args: argparse.Namespace, run: Any) -> tuple[str, str]:
    """(metric, mode) the best epoch is chosen by: --best-metric (default knn_acc where measured, else ssl_loss),
    --best-mode (default: the metric's own direction, ``csl.metrics``)."""
    from csl.metrics import METRICS

    metric = args.best_metric or ("knn_acc" if "knn_acc" not in run.unmeasured else "ssl_loss")
    if metric not in METRICS:
        raise ChoiceError(f"--best-metric: unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    if metric in run.unmeasured:
        raise ChoiceError(f"--best-metric {metric}: this run does not measure it ({run.unmeasured[metric]})")
    return metric, args.best_mode or METRICS[metric].mode


def saved_best(folder: Path | None, metric: str, mode: str) -> Any:
    """The running best a checkpoint folder's best/ records for (metric, mode), else none (``csl.best``)."""
    import json

    from csl.best import NONE, Best

    file = folder / BEST_DIR / BEST_FILE if folder else None
    if file is None or not file.is_file():
        return NONE
    saved = json.loads(file.read_text())
    if (saved.get("metric"), saved.get("mode")) != (metric, mode):
        return NONE
    return Best(int(saved["epoch"]), float(saved["value"]))


def keep_best(folder: Path, run: Any, best: Any, metrics: dict[str, float], metric: str, mode: str) -> Any:
    """Save the epoch into ``folder``/best/ when it becomes the best (``csl.best.improves``); the running best."""
    import json
    import shutil

    from csl.best import improves, update

    if not improves(best, metrics.get(metric), mode):
        return best
    best = update(best, run.epoch, metrics[metric], mode)
    target, partial = folder / BEST_DIR, folder / f".{BEST_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run.save(partial)
    (partial / BEST_FILE).write_text(json.dumps({"metric": metric, "mode": mode, "epoch": best.epoch,
                                                 "value": best.value}))  # fmt: skip
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)  # a kill in between leaves the older best or none, never half of one
    return best


def _train(args: argparse.Namespace, run: Any) -> int:
    import shutil

    from tqdm import tqdm

    from csl.evaluate import extract_features, linear_eval

    print("config: " + " ".join(f"{a}={run.config[a]}" for a in ASPECTS) + f" data={run.config['data']} "
          f"epochs={run.config['epochs']} device={run.device} precision={'bf16' if run.autocast else 'float32'}",
          flush=True)
    if args.resume:
        run.load(args.resume)
    metric, mode = best_metric(args, run)
    best = saved_best(args.resume, metric, mode)
    if args.checkpoint and args.resume and best.found and Path(args.checkpoint).resolve() != args.resume.resolve():
        shutil.copytree(args.resume / BEST_DIR, Path(args.checkpoint) / BEST_DIR, dirs_exist_ok=True)
    start = time.perf_counter()
    while run.epoch < run.config["epochs"]:
        with tqdm(total=run.steps_per_epoch * run.config["batch_size"], unit="img", leave=False,
                  desc=f"epoch {run.epoch + 1}", disable=not sys.stderr.isatty()) as bar:
            metrics = run.train_epoch(progress=bar.update)
        metrics |= run.evaluate()
        print(progress_line(run.epoch, run.config["epochs"], metrics), flush=True)
        if args.checkpoint:
            run.save(args.checkpoint)
            best = keep_best(Path(args.checkpoint), run, best, metrics, metric, mode)
    if args.linear_epochs and run.test_data is None:
        print(f"linear evaluation skipped: {run.unmeasured['knn_acc']}")
    elif args.linear_epochs:
        batch = max(256, run.config["batch_size"])
        tx, ty = extract_features(run.model, run.pipeline, run.eval_train, batch_size=batch, device=run.device,
                                  autocast=run.autocast)
        vx, vy = extract_features(run.model, run.pipeline, run.test_data, batch_size=batch, device=run.device,
                                  autocast=run.autocast)
        acc = linear_eval(tx, ty, vx, vy, num_classes=run.num_classes, epochs=args.linear_epochs)
        print(f"linear evaluation ({args.linear_epochs} epochs on frozen features): acc={acc:.4f}")
    done = progress_line(run.epoch, run.config["epochs"], run.last_eval)
    print(f"done in {time.perf_counter() - start:.1f}s: {done}")
    if args.checkpoint and best.found:
        print(f"best epoch {best.epoch} ({metric} {best.value:.4g}, {mode}): {Path(args.checkpoint) / BEST_DIR}; "
              f"its encoder: csl.embedder.from_checkpoint('{Path(args.checkpoint) / BEST_DIR}')")
    return 0


# What a user can fix: wrong options or choices, a combination that cannot train, missing or undecodable data, a
# damaged checkpoint (CheckpointError is a ValueError; DataNotFoundError a FileNotFoundError).
EXPECTED = (ChoiceError, CombinationError, ValueError, OSError)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class OneLineParser(argparse.ArgumentParser):
    """A bad option or value is one line and exit 2 (argparse prints its whole usage first); --help keeps it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="csl", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser("list", help="every registered choice of every aspect, and every preset", parents=[common])
    train = sub.add_parser("train", help="train one configuration; any option as --name value", parents=[common],
                           epilog="e.g. csl train --method simclr --encoder resnet18 --width 0.25 --epochs 5")
    train.add_argument("--method", choices=sorted(PRESETS))
    train.add_argument("--checkpoint", type=Path,
                       help="save the training state here after every epoch, and the best epoch's in CHECKPOINT/best/")
    train.add_argument("--best-metric", help="metric of the best epoch (default: knn_acc if measured, else ssl_loss)")
    train.add_argument("--best-mode", choices=MODES, help="max or min (default: the metric's direction)")
    train.add_argument("--resume", type=Path, help="continue from a checkpoint folder")
    train.add_argument("--linear-epochs", type=int, default=0, help="then run offline linear evaluation")
    args, extra = parser.parse_known_args(argv)
    import csl  # noqa: F401  (registers every choice)

    saved = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if args.command == "list":
            print_choices()
            return 0
        return cmd_train(args, extra, list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(f"csl: interrupted: {exc}" if isinstance(exc, Interrupted) else "csl: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as error:
        if args.debug:
            raise
        print(f"csl: error: {one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one line unless --debug asks for the traceback
        if args.debug:
            raise
        print(f"csl: error: {type(error).__name__}: {one_line(error)} (--debug shows where)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, saved)


if __name__ == "__main__":
    sys.exit(main())

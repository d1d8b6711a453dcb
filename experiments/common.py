"""What the three studies share: scales, the command line, running the searches (``search.run.run_search``, the
function ``csl-search run`` calls) under one MLflow study run. The generated space files, and the probing that
keeps refused combinations out of them, are in ``experiments.spaces``.

Layout of one study (``--storage runs`` by default)::

    runs/mlflow.db                      the tracking store (unless --mlflow-uri)
    runs/<study run name>/              the study folder
        <stage>.yaml                    the generated space of each stage (a grid over method × encoder × seed ...)
        <stage>/                        the Ray experiment folder of that stage (results.parquet, history.parquet)
        report/                         report.md and its PNG plots (also logged to the study run)

MLflow: one *study run* (tag ``csl.study``, artifact ``study.json``: the design the report needs) is the parent of
each stage's search run, which is the parent of that stage's trial runs (made by ``search.tracking``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METHODS = ("amdim", "cpc_v2", "simclr", "byol", "moco_v2", "yadim")
ASPECTS = ("augment", "encoder", "extract", "similarity", "loss")  # the five aspects of a design
STUDY_TAG = "csl.study"
STAGE_TAG = "csl.stage"
PARENT_TAG = "mlflow.parentRunId"
STUDY_FILE = "study.json"
YADIM_PUBLISHED = {
    "augment": "yadim", "encoder": "wide_resnet", "extract": "last_map", "similarity": "dot", "loss": "amdim_nce",
}
"""YADIM as Falcon & Cho 2020 published it: AMDIM+CPC augmentation pipelines, wide ResNet-34, last-layer feature
map comparison, dot product, NCE (csl/presets.py)."""

# The 1/16-wide encoders and small heads of the framework's own tests (tests/helpers.py): a real run in seconds.
_TINY = {
    "width": 0.0625, "proj_dim": 16, "proj_hidden": 32, "pred_hidden": 32, "ndf": 64, "n_rkhs": 128, "n_depth": 1,
    "queue_size": 64, "warmup_epochs": 0, "context_hidden": 32,
}


def shared_cifar10() -> str:
    """The shared CIFAR-10 copy (``../shared/data/cifar10``) as an absolute ``parquet:`` spec, else torchvision's."""
    folder = (REPO.parent / "shared" / "data" / "cifar10").resolve()
    return f"parquet:{folder}" if (folder / "train.parquet").exists() else "cifar10"


@dataclass(frozen=True)
class Scale:
    """Budgets of one scale. ``fixed`` goes into every trial (and overrides the presets where it names a key)."""

    name: str
    description: str
    fixed: Mapping[str, Any]
    epochs: int
    seeds: tuple[int, ...]
    encoders: tuple[str, ...]  # encoder study; and rediscover stage (b)
    extraction_encoder: str | None  # extraction study: one encoder for every method (None: each preset's own)
    extractions: tuple[str, ...]  # rediscover stage (b)
    grace_period: int  # the grace period the early-stopping check looks at (and stage (a)'s ASHA)
    search_encoder: str  # rediscover stage (a): the one encoder
    search_epochs: int
    search_samples: int
    reduction_factor: int
    top_k: int
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    data_fn: Any = field(default=None, compare=False)  # called at run time when fixed has no "data"

    def trial_fixed(self) -> dict[str, Any]:
        fixed = dict(self.fixed)
        if "data" not in fixed and self.data_fn is not None:
            fixed["data"] = self.data_fn()
        return fixed


ALL_ENCODERS = ("resnet18", "resnet34", "resnet50", "wide_resnet", "amdim", "cpc_resnet")
ALL_EXTRACTIONS = ("last_vector", "multiscale", "cpc_context", "last_map")

SCALES: dict[str, Scale] = {
    # CI: 2 CPU cores, minutes. The embedded data, 1/16-wide encoders, 256 training images, 2 epochs, 2 seeds.
    # Only the plumbing and the statistics are exercised: accuracies at this size are near chance.
    "smoke": Scale(
        name="smoke",
        description="CPU, minutes: cifar10-mini (256 train / 128 test images), 1/16-wide encoders, 2 epochs, 2 seeds",
        # CPC's patch grid is cut from 7×7 overlapping patches to 4×4 disjoint ones (5× less compute), and the
        # kNN evaluation uses k=20 (k=200 of 256 training images would vote with nearly all of them).
        fixed={"data": "cifar10-mini", "train_limit": 256, "test_limit": 128, "batch_size": 32, "device": "cpu",
               "patch_size": 8, "patch_overlap": 0, "knn_k": 20, **_TINY},
        epochs=2, seeds=(0, 1), encoders=("resnet18", "amdim"), extraction_encoder="resnet18",
        extractions=("last_vector", "last_map"), grace_period=1, search_encoder="resnet18", search_epochs=2,
        search_samples=6, reduction_factor=2, top_k=2,
    ),
    # One GPU, hours: all of CIFAR-10 (the shared Parquet copy, else torchvision's), quarter-width encoders, the
    # presets' own batch sizes and heads. Four trials share the GPU.
    "cifar": Scale(
        name="cifar",
        description="one GPU, hours: CIFAR-10 (50,000 / 10,000), quarter-width encoders, 30 epochs, 3 seeds",
        fixed={"width": 0.25}, data_fn=shared_cifar10,
        epochs=30, seeds=(0, 1, 2), encoders=ALL_ENCODERS, extraction_encoder=None,
        extractions=("last_vector", "multiscale", "last_map"), grace_period=5, search_encoder="resnet18",
        search_epochs=30, search_samples=64, reduction_factor=3, top_k=3, cpus_per_trial=4, gpus_per_trial=0.25,
    ),
    # A cluster (csl-search's --address): full-width encoders, long schedules, 5 seeds, every encoder and
    # extraction. The epoch counts are this project's reading of the paper's budgets, not the paper's numbers.
    "paper": Scale(
        name="paper",
        description="cluster: CIFAR-10, full-width encoders, 200 epochs, 5 seeds, every encoder and extraction",
        fixed={"width": 1.0}, data_fn=shared_cifar10,
        epochs=200, seeds=(0, 1, 2, 3, 4), encoders=ALL_ENCODERS, extraction_encoder=None,
        extractions=ALL_EXTRACTIONS, grace_period=20, search_encoder="resnet18", search_epochs=200,
        search_samples=256, reduction_factor=3, top_k=5, cpus_per_trial=8, gpus_per_trial=1.0,
    ),
}


# ------------------------------------------------------------------------------------------------ command line


def parser(study: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{study}", description=description)
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke", help="budget (default: smoke)")
    p.add_argument("--storage", default="runs", help="folder for the study folder and the default store (runs)")
    p.add_argument("--mlflow-uri", help="tracking store (default: sqlite:///<storage>/mlflow.db)")
    p.add_argument("--experiment", help=f"MLflow experiment (default: {study})")
    p.add_argument("--name", help="study run / folder name (default: <study>-<scale>-<date>-<time>)")
    p.add_argument("--seeds", help="comma-separated training seeds (default: the scale's)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the scale's)")
    p.add_argument("--data", help="data set spec for every trial (default: the scale's)")
    p.add_argument("--address", help="Ray cluster to connect to (host:port) instead of starting one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the scale's)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (default: the scale's)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the searcher and the bootstrap (default: 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray Tune progress output")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def scale_from_args(args: argparse.Namespace) -> Scale:
    scale = SCALES[args.scale]
    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if args.epochs:
        changes["epochs"] = args.epochs
        changes["search_epochs"] = args.epochs
        changes["grace_period"] = min(scale.grace_period, args.epochs)
    if args.data:
        changes["fixed"] = {**scale.fixed, "data": args.data}
    if args.cpus_per_trial:
        changes["cpus_per_trial"] = args.cpus_per_trial
    if args.gpus_per_trial is not None:
        changes["gpus_per_trial"] = args.gpus_per_trial
    return replace(scale, **changes) if changes else scale


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Study:
    """One study run in MLflow and its folder; ``run_stage`` runs one search under it."""

    name: str  # the study (encoder_robustness, ...)
    args: argparse.Namespace
    scale: Scale
    run_name: str
    folder: Path
    tracking_uri: str
    experiment: str
    experiment_id: str
    run_id: str
    design: dict[str, Any]
    started_ray: bool = False
    outcomes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, args: argparse.Namespace, scale: Scale, design: Mapping[str, Any]) -> Study:
        from mlflow import MlflowClient

        from search import storage as storage_checks
        from search.run import init_ray
        from search.tracking import check_reachable, ensure_experiment, git_commit, local_tracking_uri, store_lock

        storage = Path(args.storage).expanduser().resolve()
        storage_checks.check_writable(str(storage))
        run_name = args.name or storage_checks.unique_name(f"{name}-{scale.name}")
        folder = storage / run_name
        storage_checks.create_folder(str(folder))
        tracking_uri = args.mlflow_uri or local_tracking_uri(storage)
        with store_lock(tracking_uri):
            check_reachable(tracking_uri, given=args.mlflow_uri is not None)
            client = MlflowClient(tracking_uri=tracking_uri)
            experiment = args.experiment or name
            local_sqlite = tracking_uri.startswith("sqlite")
            artifacts = str(storage / "mlartifacts") if local_sqlite else None
            experiment_id = ensure_experiment(client, experiment, artifacts)
        command = "python -m experiments." + name + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        tags = {STUDY_TAG: name, "csl.scale": scale.name, "csl.study_folder": str(folder), "csl.command": command,
                "mlflow.source.name": f"experiments.{name}"}
        commit = git_commit(REPO)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        design = {"study": name, "scale": scale.name, "scale_description": scale.description,
                  "command": command, "n_resamples": args.resamples, "bootstrap_seed": args.seed, **design}
        study = cls(name, args, scale, run_name, folder, tracking_uri, experiment, experiment_id, run.info.run_id,
                    design)
        study.save_design()
        study.started_ray = init_ray(args.address, args.num_cpus, scale.gpus_per_trial)
        return study

    @property
    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def save_design(self) -> None:
        (self.folder / STUDY_FILE).write_text(json.dumps(self.design, indent=2, default=str))
        self.client.log_dict(self.run_id, json.loads(json.dumps(self.design, default=str)), STUDY_FILE)

    def run_stage(self, stage: str, space_path: Path, *, scheduler: str, searcher: str,
                  num_samples: int | None = None) -> Any:
        """Run one search (``search.run.run_search``) and hang its parent run under the study run."""
        from search.run import SearchOptions, run_search
        from search.space import load_space

        space = load_space(space_path)
        options = SearchOptions(
            scheduler=scheduler, searcher=searcher, num_samples=num_samples,
            cpus_per_trial=self.scale.cpus_per_trial, gpus_per_trial=self.scale.gpus_per_trial,
            storage=str(self.folder), name=stage, address=self.args.address, num_cpus=self.args.num_cpus,
            seed=self.args.seed, mlflow_uri=self.tracking_uri, experiment=self.experiment,
            verbose=1 if self.args.verbose else 0,
        )  # fmt: skip
        command = f"csl-search run {space_path} --scheduler {scheduler} --searcher {searcher} (study {self.name})"
        outcome = run_search(space, options, command=command)
        client = self.client
        client.set_tag(outcome.parent_run_id, PARENT_TAG, self.run_id)
        client.set_tag(outcome.parent_run_id, STAGE_TAG, stage)
        client.set_tag(outcome.parent_run_id, STUDY_TAG + "_member", self.name)
        self.outcomes[stage] = outcome
        counts = ", ".join(f"{n} {s}" for s, n in sorted(outcome.counts().items()))
        print(f"[{self.name}] stage {stage}: {len(outcome.trials)} trials ({counts}) in {outcome.wall_time_s:.0f} s",
              flush=True)
        return outcome

    def finish(self, status: str = "FINISHED") -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False
        self.client.set_terminated(self.run_id, status=status)


def run_study(name: str, args: argparse.Namespace, scale: Scale, design: Mapping[str, Any], body: Any) -> int:
    """Start the study run, call ``body(study)`` (which runs the stages), write the report, end the run.

    An expected error is one line and an exit code (``search.errors``, as ``csl-search``); ``--debug`` raises it.
    """
    from search.errors import report

    try:
        return _run_study(name, args, scale, design, body)
    except (Exception, KeyboardInterrupt) as exc:
        if getattr(args, "debug", False):
            raise
        return report(f"python -m experiments.{name}", exc)


def _run_study(name: str, args: argparse.Namespace, scale: Scale, design: Mapping[str, Any], body: Any) -> int:
    from experiments.report.build import write_study_report
    from search.status import INTERRUPTED, RUN_STATUS

    study = Study.start(name, args, scale, design)
    started = time.time()
    try:
        body(study)
        study.client.log_metric(study.run_id, "study_wall_time_s", time.time() - started)
        result = write_study_report(study.tracking_uri, study.run_id, study.folder / "report",
                                    n_resamples=args.resamples, seed=args.seed)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = INTERRUPTED if interrupted else f"{type(exc).__name__}: {exc}"[:4000]
        study.client.set_tag(study.run_id, "csl.error", reason)
        study.finish(RUN_STATUS[INTERRUPTED] if interrupted else "FAILED")
        raise
    study.finish("FINISHED")
    print(result.headline)
    print(f"\nreport: {result.path}")
    print(f"MLflow: experiment '{study.experiment}', study run {study.run_id} ({study.tracking_uri})")
    print(f"again:  csl-search report {study.run_id} --mlflow-uri {study.tracking_uri}")
    return 0


def run_grid_study(name: str, args: argparse.Namespace, scale: Scale, design: Mapping[str, Any],
                   write_grid: Callable[[Scale, Path], tuple[Path, list[dict[str, Any]]]]) -> int:
    """A one-stage study (stage ``grid``, grid searcher, FIFO): ``write_grid(scale, folder)`` writes the space and
    returns the refused cells, which go into the design as not applicable before the grid runs."""

    def body(study: Study) -> None:
        path, refused = write_grid(scale, study.folder)
        study.design["not_applicable"] = [{"cell": r["cell"], "reason": r["reason"]} for r in refused]
        study.save_design()
        study.run_stage("grid", path, scheduler="fifo", searcher="grid")

    return run_study(name, args, scale, design, body)


def grid_design(title: str, condition: str, scale: Scale, **extra: Any) -> dict[str, Any]:
    """The design (``study.json``) of a one-stage robustness study: the method presets ranked over ``condition``
    at the scale's fixed budget; ``extra`` (what varies, the seeds, the fixed config) follows ``methods``."""
    return {
        "kind": "robustness",
        "title": title,
        "metric": "knn_acc", "mode": "max",
        "stages": {"grid": {"role": "robustness", "combination": "method", "conditions": [condition],
                            "scheduler": "fifo", "epochs": scale.epochs, "grace_period": scale.grace_period}},
        "methods": list(METHODS), **extra,
    }

"""Space files: every shipped space loads; every kind of mistake is one SpaceError naming file, key, value, allowed;
grid / sample / suggest / trial_config honour the constraints. No training here."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import random
import sys
from pathlib import Path

import pytest
import yaml

import csl  # noqa: F401  (registers every choice)
import csl.registry
from csl.config import resolve
from search.space import VARIANT, Constraint, Space, SpaceError, load_space

SPACES = Path(__file__).resolve().parent.parent / "spaces"
SHIPPED = sorted(SPACES.glob("*.yaml"))

if not all(reg.names() for reg in csl.registry.ASPECTS.values()):  # pragma: no cover - while csl is being written
    pytest.skip("the aspect registries are still empty (csl is being written)", allow_module_level=True)

from csl.presets import PRESETS  # noqa: E402  (after the guard: exists once the registries do)


@pytest.fixture(scope="module")
def tiny() -> Space:
    return load_space(SPACES / "tiny_grid.yaml")


# ----------------------------------------------------------------------------------------------- shipped spaces


def test_the_required_spaces_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"smoke", "methods", "paper", "yadim_neighborhood", "tiny_grid"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_loads(path: Path) -> None:
    space = load_space(path)
    assert space.name
    assert space.mode in ("max", "min") and space.metric
    assert space.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert space.text == path.read_text()
    assert space.budget["epochs"] >= space.budget["grace_period"] >= 1
    grid = space.grid()
    assert grid, "a shipped space allows nothing"
    assert all(space.violation(c) is None for c in grid)
    config = space.trial_config(space.sample(random.Random(0)))
    assert config["epochs"] == space.budget["epochs"]
    resolve(config)  # the framework accepts what the space proposes


def test_smoke_is_small_and_searches_aspects() -> None:
    space = load_space(SPACES / "smoke.yaml")
    assert space.aspects() == ["augment", "similarity", "loss"]
    assert space.fixed["data"] == "cifar10-mini" and space.fixed["encoder"] == "resnet18"
    assert space.fixed["train_limit"] <= 1024 and space.fixed["width"] <= 0.125
    assert space.budget["epochs"] <= 3
    assert space.dimensions["lr"].kind == "loguniform"


def test_methods_is_presets_by_encoders() -> None:
    space = load_space(SPACES / "methods.yaml")
    assert space.aspects() == ["method", "encoder"]
    assert set(space.dimensions["method"].values) == set(PRESETS)
    assert len(space.grid()) == len(PRESETS) * len(space.dimensions["encoder"].values)


def test_paper_spans_every_registered_choice_and_excludes_what_cannot_train() -> None:
    space = load_space(SPACES / "paper.yaml")
    assert space.aspects() == ["augment", "encoder", "extract", "similarity", "loss"]
    for aspect, registry in csl.registry.ASPECTS.items():
        assert set(space.dimensions[aspect].values) == set(registry.names()), aspect
    grid = space.grid()
    assert not any(c["loss"] == "byol" and c["similarity"] != "cosine" for c in grid)
    assert not any(c["augment"] == "cpc" and c["extract"] == "multiscale" for c in grid)
    assert len(grid) == 6 * 6 * 4 * 3 * 5 - 6 * 6 * 4 * 2 - 6 * 3 * 5 + 6 * 2  # inclusion-exclusion


# ----------------------------------------------------------------------------------------------- bad files

GOOD_PARAMS = "{augment: simclr, similarity: cosine, loss: infonce}"
GOOD_FIXED = "{data: cifar10-mini, encoder: resnet18, extract: last_vector}"


def spec(*, params: str = GOOD_PARAMS, fixed: str = GOOD_FIXED, budget: str = "{epochs: 2}", mode: str = "max",
         extra: str = "") -> str:
    return f"metric: knn_acc\nmode: {mode}\nbudget: {budget}\nfixed: {fixed}\nparams: {params}\n{extra}"


# (id, file text, the key, the bad value, an allowed value or None)
BAD = [
    ("unknown-aspect-in-choice", spec(params="{augment: simclr, similarity: cosine, loss: {choice: [infonce, infonse]}}"),
     "loss", "infonse", "triplet"),
    ("unknown-aspect-fixed", spec(params="{augment: simclr, similarity: cosin, loss: infonce}"),
     "similarity", "cosin", "bilinear"),
    ("unknown-aspect-in-constraint", spec(extra="constraints: [{when: {loss: infonce}, require: {similarity: [cosin]}}]"),
     "similarity", "cosin", "bilinear"),
    ("unknown-preset", spec(params="{method: {choice: [simclr, simclr2]}}", fixed="{data: cifar10-mini}"),
     "method", "simclr2", "moco_v2"),
    ("loguniform-strings", spec(params=GOOD_PARAMS[:-1] + ", lr: {loguniform: [a, b]}}"), "lr", "'a'", "numbers"),
    ("low-not-below-high", spec(params=GOOD_PARAMS[:-1] + ", lr: {uniform: [0.5, 0.1]}}"), "lr", "0.5", "low < high"),
    ("loguniform-low-zero", spec(params=GOOD_PARAMS[:-1] + ", lr: {loguniform: [0, 0.1]}}"), "lr", "0", "0 < low"),
    ("int-bounds-not-ints", spec(params=GOOD_PARAMS[:-1] + ", proj_dim: {int: [32.5, 256]}}"),
     "proj_dim", "32.5", "ints"),
    ("option-wrong-type", spec(params=GOOD_PARAMS[:-1] + ", batch_size: '64'}"), "batch_size", "'64'", "an int"),
    ("float-draw-for-int-option", spec(params=GOOD_PARAMS[:-1] + ", batch_size: {uniform: [16, 64]}}"),
     "batch_size", "[16, 64]", "int"),
    ("unknown-distribution", spec(params=GOOD_PARAMS[:-1] + ", lr: {normal: [0, 1]}}"), "lr", "normal", "loguniform"),
    ("unknown-top-level-key", spec(extra="metrc: probe_acc"), "metrc", "metrc", "metric"),
    ("unknown-param-key", spec(params=GOOD_PARAMS[:-1] + ", temprature: 0.1}"), "temprature", "temprature",
     "temperature"),
    ("unknown-fixed-key", spec(fixed=GOOD_FIXED[:-1] + ", widht: 0.5}"), "widht", "widht", "width"),
    ("epochs-not-positive", spec(budget="{epochs: 0}"), "budget.epochs", "0", "positive int"),
    ("epochs-not-int", spec(budget="{epochs: '3'}"), "budget.epochs", "'3'", "positive int"),
    ("unknown-budget-key", spec(budget="{epochs: 3, grace: 1}"), "budget.grace", "grace", "grace_period"),
    ("epochs-outside-budget", spec(params=GOOD_PARAMS[:-1] + ", epochs: 3}"), "params.epochs", "3", "budget"),
    ("bad-mode", spec(mode="maximize"), "mode", "maximize", "min"),
    ("list-instead-of-choice", spec(params="{augment: simclr, similarity: [cosine, dot], loss: infonce}"),
     "similarity", "['cosine', 'dot']", "choice"),
    ("constraint-unknown-key", spec(extra="constraints: [{when: {los: byol}, require: {similarity: cosine}}]"),
     "los", "los", "loss"),
    ("constraint-unknown-field", spec(extra="constraints: [{if: {loss: byol}, require: {similarity: cosine}}]"),
     "constraints[0].if", "if", "when"),
    ("constraint-on-continuous", spec(params=GOOD_PARAMS[:-1] + ", lr: {uniform: [0.1, 0.5]}}",
                                      extra="constraints: [{forbid: {lr: 0.2}}]"), "lr", "lr", "categorical"),
    ("contradictory-constraints",
     spec(params="{augment: simclr, similarity: {choice: [dot, cosine]}, loss: infonce}",
          extra="constraints:\n  - {require: {similarity: cosine}, reason: only cosine}\n"
                "  - {forbid: {similarity: cosine}, reason: never cosine}"),
     "constraints", "never cosine", None),
    ("value-excluded-everywhere",
     spec(params="{augment: simclr, similarity: dot, loss: {choice: [infonce, byol]}}",
          extra="constraints: [{when: {loss: byol}, require: {similarity: cosine}, reason: byol needs cosine}]"),
     "loss", "byol", "infonce"),
    ("aspect-missing", spec(params="{augment: simclr, similarity: cosine}"), "loss", "loss", "triplet"),
    ("variant-unknown-aspect", spec(params="{}", fixed="{data: cifar10-mini}",
                                    extra="base: {method: yadim}\nvariants: [{augment: amdim}, {encoder: resnet99}]"),
     "variants[1].encoder", "resnet99", "resnet50"),
    ("variant-overrides-fixed", spec(extra="variants: [{encoder: resnet50}]"), "variants[0].encoder", "encoder",
     "base keys"),
    ("variant-equals-base", spec(params="{}", fixed="{data: cifar10-mini}",
                                 extra="base: {method: yadim}\nvariants: [{augment: yadim}]"),
     "variants[0]", "augment=yadim", "change"),
    ("duplicate-key", spec(extra="mode: min"), "mode", "line 6", None),
]


@pytest.mark.parametrize(("text", "key", "value", "allowed"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_space_is_one_clear_error(tmp_path: Path, text: str, key: str, value: str, allowed: str | None) -> None:
    path = tmp_path / "bad_space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "bad_space.yaml" in message
    assert key in message
    assert value in message
    if allowed is not None:
        assert allowed in message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("metric: knn_acc\nmode: max\nparams: {lr: {uniform: [0.1, 0.5]}\nbudget: {epochs: 1}\n")
    with pytest.raises(SpaceError, match=r"broken\.yaml: line \d+, column \d+: invalid YAML"):
        load_space(path)


def test_the_good_spec_is_good(tmp_path: Path) -> None:
    """The bad cases above are one mistake away from a valid file."""
    path = tmp_path / "good.yaml"
    path.write_text(spec(params=GOOD_PARAMS[:-1] + ", lr: {loguniform: [1e-4, 1e-2]}}"))
    space = load_space(path)
    assert space.dimensions["lr"].low == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; we read a float
    assert space.name == "good" and space.budget == {"epochs": 2, "grace_period": 1, "reduction_factor": 2}


def test_without_presets_method_spaces_are_refused_and_others_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "csl.presets", None)  # as while csl/presets.py did not exist
    assert load_space(SPACES / "smoke.yaml").grid()
    with pytest.raises(SpaceError, match="csl.presets"):
        load_space(SPACES / "methods.yaml")


# ----------------------------------------------------------------------------------------------- grid / sample


def tiny_allowed(augment: str, similarity: str, loss: str) -> bool:
    """tiny_grid.yaml's two constraints, written out by hand."""
    return not (loss == "triplet" and similarity == "bilinear") and not (augment == "amdim" and similarity == "bilinear")


def test_grid_enumerates_each_allowed_combination_once(tiny: Space) -> None:
    product = list(itertools.product(["simclr", "amdim"], ["cosine", "dot", "bilinear"], ["infonce", "triplet"]))
    expected = [combo for combo in product if tiny_allowed(*combo)]
    grid = tiny.grid()
    got = [(c["augment"], c["similarity"], c["loss"]) for c in grid]
    assert len(expected) == 9
    assert got == expected  # every allowed combination, once, in product order; none of the excluded
    assert tiny.grid() == grid
    for config in grid:
        assert config["lr"] == pytest.approx(math.sqrt(1e-4 * 1e-2))  # loguniform: geometric mean
        assert {k: config[k] for k in tiny.fixed} == tiny.fixed
        assert "epochs" not in config


def test_violation_names_the_reason(tiny: Space) -> None:
    assert tiny.violation({"augment": "amdim", "similarity": "bilinear", "loss": "infonce"}) == \
        "fixture: no bilinear similarity after the amdim pipeline"
    assert tiny.violation({"augment": "simclr", "similarity": "bilinear", "loss": "triplet"}).startswith("fixture")
    assert tiny.violation({"augment": "simclr", "similarity": "dot", "loss": "triplet"}) is None


def test_constraints_see_the_preset() -> None:
    paper = load_space(SPACES / "paper.yaml")
    assert "cosine" in paper.violation({"method": "byol", "similarity": "dot"})  # loss byol comes from the preset
    assert paper.violation({"method": "byol"}) is None


def test_sample_never_violates(tiny: Space) -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(500):
        config = tiny.sample(rng)
        assert tiny.violation(config) is None
        assert tiny_allowed(config["augment"], config["similarity"], config["loss"])
        assert 1e-4 <= config["lr"] <= 1e-2
        seen.add((config["augment"], config["similarity"], config["loss"]))
    assert len(seen) == 9
    assert tiny.sample(random.Random(3)) == tiny.sample(random.Random(3))
    paper = load_space(SPACES / "paper.yaml")
    for _ in range(300):
        config = paper.sample(rng)
        assert config["loss"] != "byol" or config["similarity"] == "cosine"
        assert not (config["augment"] == "cpc" and config["extract"] == "multiscale")


def test_sample_gives_up_when_nothing_is_allowed(tiny: Space) -> None:
    blocked = dataclasses.replace(tiny, constraints=[Constraint(reason="nothing", forbid={"encoder": ("resnet18",)})])
    with pytest.raises(SpaceError, match="nothing"):
        blocked.sample(random.Random(0), tries=50)


def test_trial_config_adds_the_epoch_budget(tiny: Space) -> None:
    params = {"augment": "amdim", "similarity": "dot", "loss": "triplet", "lr": 3e-3}
    config = tiny.trial_config(params)
    assert config == {**tiny.fixed, **params, "epochs": 1}
    resolve(config)


# ----------------------------------------------------------------------------------------------- optuna


def test_suggest_with_a_real_optuna_study(tiny: Space) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        config = tiny.suggest(trial)
        assert set(trial.params) == set(tiny.dimensions)
        assert all(config[k] == v for k, v in trial.params.items())
        assert {k: config[k] for k in tiny.fixed} == tiny.fixed
        assert 1e-4 <= config["lr"] <= 1e-2
        if tiny.violation(config) is None:
            study.tell(trial, 0.5)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    distributions = study.trials[0].distributions
    assert distributions["lr"].log is True
    assert list(distributions["similarity"].choices) == ["cosine", "dot", "bilinear"]


# ----------------------------------------------------------------------------------------------- neighbourhood


def test_yadim_neighborhood_is_base_plus_one_aspect_at_a_time() -> None:
    path = SPACES / "yadim_neighborhood.yaml"
    raw = yaml.safe_load(path.read_text())
    space = load_space(path)
    grid = space.grid()
    assert len(grid) == 1 + len(raw["variants"])
    assert grid[0] == {**raw["fixed"], **raw["base"]}
    yadim = PRESETS["yadim"]
    for variant, config in zip(raw["variants"], grid[1:], strict=True):
        assert config == {**raw["fixed"], **raw["base"], **variant}
        (aspect, value), = variant.items()  # exactly one aspect changed ...
        assert aspect in csl.registry.ASPECTS and yadim[aspect] != value  # ... to something else than YADIM's
    assert space.aspects() == ["augment", "encoder", "extract", "similarity", "loss"]
    assert list(space.dimensions) == [VARIANT]
    assert [space.variant_of(c) for c in grid] == list(space.variants)
    assert space.variant_of(space.trial_config({VARIANT: "encoder=resnet50"})) == "encoder=resnet50"
    assert space.trial_config({VARIANT: "encoder=resnet50"})["encoder"] == "resnet50"
    rng = random.Random(0)
    assert all(space.sample(rng) in grid for _ in range(50))
    with pytest.raises(SpaceError, match="unknown variant"):
        space.trial_config({VARIANT: "encoder=vgg"})


def test_suggest_picks_a_variant() -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(SPACES / "yadim_neighborhood.yaml")
    trial = optuna.create_study().ask()
    config = space.suggest(trial)
    name = trial.params[VARIANT]
    assert name in space.variants
    assert {**config, "epochs": space.budget["epochs"]} == space.trial_config({VARIANT: name})
    assert config in space.grid()
    assert space.label(config) == name

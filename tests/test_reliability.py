"""The pieces that keep a search's work safe, each on its own: JSON searcher state and replays, the ledger, the
folder checks, signal handling, the reaper of a local Ray instance, divergence, trial statuses.

Fast (no Ray instance, no training beyond a few steps); the end-to-end kills and resumes are in test_resume.py.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, search_env
from tests.helpers import tiny

SPACE = """\
name: rel
metric: ssl_loss
mode: min
budget: {epochs: 2}
fixed: {method: simclr, width: 0.0625, batch_size: 16, train_limit: 64, device: cpu}
params:
  similarity: {choice: [cosine, dot, bilinear]}
  temperature: {choice: [0.2, 0.5, 1.0]}
  lr: {loguniform: [3.0e-4, 3.0e-3]}
constraints:
  - when: {similarity: dot}
    require: {temperature: 1.0}
"""


class Payload:
    """A pickle that runs a shell command when it is loaded: what a tampered experiment folder would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from search.space import load_space

    path = tmp_path_factory.mktemp("space") / "rel.yaml"
    path.write_text(SPACE)
    return load_space(path)


def _searcher(kind: str, space: Any, ledger: Any = None) -> Any:
    from search.searchers import make_searcher

    searcher = make_searcher(kind, space, max_epochs=2, seed=3)
    searcher.ledger = ledger
    return searcher


def _finish(searcher: Any, trial_id: str, value: float) -> None:
    searcher.on_trial_result(trial_id, {"ssl_loss": value, "epoch": 1})
    searcher.on_trial_complete(trial_id, {"ssl_loss": value, "epoch": 2})


# ---------------------------------------------------------------------------------------------------- searchers


@pytest.mark.parametrize("kind", ["optuna", "random", "grid"])
def test_a_restored_searcher_replays_what_tune_lost_and_never_repeats_itself(
    kind: str, space: Any, tmp_path: Path
) -> None:
    """Four proposals, a snapshot after two; the driver dies; the restored searcher replays the two lost ones with
    their recorded configs, then goes on with new ones, as the same searcher run without a kill would have."""
    from search.ledger import Ledger

    ledger = Ledger(str(tmp_path))
    first = _searcher(kind, space, ledger)
    configs = {}
    for i in range(4):
        configs[f"t{i}"] = first.suggest(f"t{i}")
        if i < 2:
            _finish(first, f"t{i}", 1.0 + i)
        if i == 1:
            first.save(str(tmp_path / "searcher-state.pkl"))  # Tune's snapshot: t0, t1
    assert [p.trial_id for p in Ledger(str(tmp_path)).planned()] == ["t0", "t1", "t2", "t3"]

    restored = _searcher(kind, space, Ledger(str(tmp_path)))
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert set(restored.launched) == {"t0", "t1"}
    restored.replays = [("t2", configs["t2"]), ("t3", configs["t3"])]
    assert restored.suggest("r2") == configs["t2"] and restored.suggest("r3") == configs["t3"]
    new = [restored.suggest(f"n{i}") for i in range(2)]

    plan = Ledger(str(tmp_path)).planned()
    assert [(p.first_id, p.trial_id) for p in plan] == [("t0", "t0"), ("t1", "t1"), ("t2", "r2"), ("t3", "r3"),
                                                         ("n0", "n0"), ("n1", "n1")]  # fmt: skip
    if kind == "optuna":
        assert all(config not in configs.values() for config in new)  # lr is continuous: a repeat is a bug
        states = [t.state.name for t in restored.study.trials]
        assert states.count("COMPLETE") == 2 and states.count("RUNNING") == 4  # t2, t3 asked again; n0, n1
    else:  # deterministic: exactly what an uninterrupted searcher proposes
        reference = _searcher(kind, space)
        assert new == [reference.suggest(f"x{i}") for i in range(6)][4:]


def test_a_searcher_state_is_json_and_a_pickle_in_its_place_is_refused_unrun(space: Any, tmp_path: Path) -> None:
    from search.searchers import SearcherStateError

    searcher = _searcher("optuna", space)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "state"))
    state = json.loads((tmp_path / "state").read_text())
    assert state["format"] == "csl-searcher-1" and "a" in state["records"]

    marker = tmp_path / "pwned"
    (tmp_path / "payload").write_bytes(pickle.dumps(Payload(marker)))
    (tmp_path / "cut").write_text((tmp_path / "state").read_text()[:40])
    for name in ("payload", "cut"):
        with pytest.raises(SearcherStateError, match="not a csl-search searcher state"):
            _searcher("optuna", space).restore(str(tmp_path / name))
    with pytest.raises(SearcherStateError, match="optuna searcher's"):
        _searcher("grid", space).restore(str(tmp_path / "state"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- ledger, folder


def test_the_ledger_chains_replays_and_ignores_a_line_cut_short(tmp_path: Path) -> None:
    from search.ledger import LEDGER_FILE, Ledger

    ledger = Ledger(str(tmp_path))
    ledger.record("a", {"lr": 1})
    ledger.record("b", {"lr": 2})
    ledger.record("c", {"lr": 2}, replays="b")
    ledger.record("d", {"lr": 2}, replays="c")
    with open(tmp_path / LEDGER_FILE, "a") as f:
        f.write('{"trial_id": "e", "con')  # the driver died while writing
    read = Ledger(str(tmp_path))
    chains = [(p.first_id, p.trial_id, p.ids) for p in read.planned()]
    assert chains == [("a", "a", ("a",)), ("b", "d", ("b", "c", "d"))]
    assert read.replayed("d") == ["c", "b"] and read.replayed("a") == []


def test_folder_checks_refuse_foreign_pickles_and_others_writable_folders(tmp_path: Path) -> None:
    from search import trust

    marker = tmp_path / "pwned"
    with pytest.raises(trust.UntrustedFolder, match="posix.system"):
        trust.check_pickle(pickle.dumps(Payload(marker)), "x")
    with pytest.raises(trust.UntrustedFolder, match="damaged"):
        trust.check_pickle(pickle.dumps({"a": [1, 2, 3]})[:-3], "x")
    trust.check_pickle(pickle.dumps({"a": [1, 2, 3]}), "plain data")
    assert not marker.exists()

    state = {"trial_data": [[json.dumps({"trial_id": "t", "status": "RUNNING",
                                         "storage": {"_type": "CLOUDPICKLE_FALLBACK",
                                                     "value": pickle.dumps(Payload(marker)).hex()}}), "{}"]],
             "runner_data": {}}  # fmt: skip
    with pytest.raises(trust.UntrustedFolder, match="posix.system"):
        trust.experiment_state(json.dumps(state), "experiment_state-x.json")
    assert not marker.exists()

    folder = tmp_path / "exp"
    folder.mkdir()
    trust.check_folder(str(folder))
    folder.chmod(0o777)
    with pytest.raises(trust.UntrustedFolder, match="writable by others"):
        trust.check_folder(str(folder))


def test_a_checkpoint_the_snapshot_names_but_tune_deleted_is_given_back(tmp_path: Path) -> None:
    """Tune deleted checkpoint_000000 once checkpoint_000001 was saved, then the driver died before the snapshot
    naming 000001 reached the folder: the resume gives 000000 back as a copy of 000001."""
    from search.recovery import ResumePlan, _missing_checkpoints, restore_checkpoints

    trial = tmp_path / "csl_trial_t1"
    (trial / "checkpoint_000001").mkdir(parents=True)
    (trial / "checkpoint_000001" / "csl_result.json").write_text('{"epoch": 2}')
    manager = pickle.dumps({"path": "/elsewhere/csl_trial_t1/checkpoint_000000"}).hex()  # as a text constant
    document = {"trial_data": [({"trial_id": "t1", "status": "RUNNING", "relative_logdir": "csl_trial_t1"},
                                {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": manager}})]}
    plan = ResumePlan("restore", [])
    plan.checkpoints = _missing_checkpoints(str(tmp_path), document)
    assert plan.checkpoints == [(str(trial / "checkpoint_000000"), str(trial / "checkpoint_000001"))]
    restore_checkpoints(plan)
    assert json.loads((trial / "checkpoint_000000" / "csl_result.json").read_text()) == {"epoch": 2}


# ---------------------------------------------------------------------------------------------------- signals, Ray


def test_signals_raise_outside_fit_and_stop_tune_gracefully_inside(tmp_path: Path) -> None:
    from search.interrupt import Interrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupt = Interrupt()
    with interrupt.catching():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)
    assert interrupt.received == [signal.SIGINT, signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before  # given back as they were

    graceful: list[int] = []
    interrupt = Interrupt()
    with interrupt.catching(), interrupt.fitting():
        signal.signal(signal.SIGUSR1, lambda sig, frame: graceful.append(sig))  # what Tune installs in fit
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        assert graceful == [signal.SIGINT] and interrupt.requested
        with pytest.raises(KeyboardInterrupt):  # the second one does not wait
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)


def test_sigterm_after_ray_starts_is_still_the_searchs(tmp_path: Path) -> None:
    """``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``): a search takes the signal back, so ``kill``
    of a driver records its trials as interrupted instead of exiting mid-write."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from search.interrupt import Interrupt
        from search.local_ray import init_ray
        interrupt = Interrupt()
        with interrupt.catching():
            init_ray(None, 1)
            print("ray's handler", signal.getsignal(signal.SIGTERM) != interrupt._handle, flush=True)
            interrupt.reclaim()
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                print("not interrupted")
            except KeyboardInterrupt:
                print("interrupted", interrupt.signal_name(), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=search_env(), capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["ray's handler True", "interrupted SIGTERM"], out.stdout


def test_the_reaper_kills_what_a_sigkilled_driver_leaves(tmp_path: Path) -> None:
    """A stand-in driver starts a process tree (as ray.init does) and its reaper, then dies by SIGKILL."""
    driver_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from search import local_ray, reaper
        before = set(reaper.children(os.getpid()))
        tree = subprocess.Popen([sys.executable, "-c",
                                 "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
        time.sleep(1)
        local_ray.start_reaper(before)
        print(tree.pid, flush=True)
        time.sleep(300)
    """)
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        tree = int(driver.stdout.readline())
        time.sleep(1.5)  # the reaper notes the tree
        from search import reaper

        family = [tree, *[pid for pid, (ppid, _, _) in reaper.processes().items() if ppid == tree]]
        assert len(family) == 2
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        deadline = time.time() + 10
        while any(reaper._stat(pid) and reaper._stat(pid)[2] != "Z" for pid in family) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(reaper._stat(pid) and reaper._stat(pid)[2] != "Z" for pid in family)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------------- training


def test_an_exploding_finite_loss_is_diverged_with_its_value() -> None:
    """Adam at lr 1e4 with dot-product scores: an epoch loss near 1e19, still finite (it used to finish)."""
    from csl.train import Diverged, divergence_bound, train

    config = tiny(method="simclr", similarity="dot", lr=1e4, epochs=2, eval_every=10)
    with pytest.raises(Diverged) as raised:
        train(config)
    exc = raised.value
    assert exc.epoch == 1 and math.isfinite(exc.loss) and exc.loss > 1e9
    assert "diverge_factor times the first step's loss" in str(exc)
    assert exc.metrics["ssl_loss"] == exc.loss and "epoch_time" in exc.metrics
    assert divergence_bound({"diverge_factor": 1000.0}, 4.2) == 4200.0
    assert divergence_bound({"diverge_factor": 1000.0}, 0.01) == 1000.0  # at least 1: a loss that starts near 0
    assert divergence_bound({"diverge_factor": 0}, 4.2) is None


def test_csl_train_ctrl_c_keeps_the_checkpoint_and_says_how_to_continue(tmp_path: Path) -> None:
    """SIGINT to a real ``csl train`` after its first epoch: exit 130, the command that continues from
    ``--checkpoint``; that command trains the remaining epochs from it."""
    checkpoint = tmp_path / "ck"
    argv = ["train", "--method", "simclr", "--width", "0.0625", "--proj_dim", "16", "--proj_hidden", "32",
            "--train_limit", "64", "--test_limit", "32", "--batch_size", "16", "--epochs", "100", "--device", "cpu",
            "--label_free_samples", "0", "--checkpoint", str(checkpoint)]  # fmt: skip
    code = "import sys; from csl.cli import main; raise SystemExit(main())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (checkpoint / "state.pt").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (checkpoint / "state.pt").exists(), process.communicate(timeout=30)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("csl: interrupted: stopped in epoch") and "Traceback" not in err, err
    command = line.split("continue: ", 1)[1].split()
    assert command[0] == "csl" and command[-2:] == ["--resume", str(checkpoint)]
    import torch

    from csl.cli import main

    saved = torch.load(checkpoint / "state.pt", weights_only=True)["epoch"]  # a whole epoch, not a cut file
    assert 1 <= saved < 100
    again = [a if a != "100" else str(saved + 1) for a in command[1:]]  # the same run, one epoch more to wait for
    assert main(again) == 0
    assert torch.load(checkpoint / "state.pt", weights_only=True)["epoch"] == saved + 1


def test_statuses_of_interrupted_and_unrunnable_trials() -> None:
    from search.status import INTERRUPTED, RUN_STATUS, trial_status

    assert trial_status("RUNNING", {"epoch": 1}, 3) == INTERRUPTED == trial_status("PENDING", {}, 3)
    assert trial_status("TERMINATED", {"epoch": 0, "failed": 1}, 3) == "failed"
    assert trial_status("TERMINATED", {"epoch": 1}, 3) == "stopped"
    assert RUN_STATUS[INTERRUPTED] == "SCHEDULED"  # neither FINISHED nor KILLED: it will run again

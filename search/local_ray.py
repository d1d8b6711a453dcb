"""The Ray instance a search runs on: a cluster it joins (``--address``), or a local one that is safe by default.

A local instance (measured on Ray 2.60, see the notes in ``init_ray``):

- listens on loopback only. Ray binds every gRPC server (GCS, raylet, object manager, workers, the driver) to
  127.0.0.1 only when its node IP is the loopback address, and ``ray.init`` turns ``_node_ip_address="127.0.0.1"``
  into the machine's LAN address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says this is a one-machine
  instance (``ray._private.services.get_node_ip_address``). With both, ``ss -ltn`` shows every Ray port on
  127.0.0.1;
- keeps Ray's token authentication on (Ray 2.60's default; ``RAY_AUTH_MODE=disabled`` turns it off); the token
  lives in ``~/.ray/auth_token``, which Ray writes world-readable: it is made readable by its owner only;
- goes down with the driver. gcs_server and raylet die with it (Ray's ``PR_SET_PDEATHSIG``), but the dashboard
  and runtime-env agents, children of the raylet, wait 60 s on a dead GCS (``publish_error_to_driver``'s fixed
  timeout) before they exit. A small watchdog (``search.reaper``) kills what is left of this instance as soon as
  the driver is gone, however it died.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from search import reaper

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ONE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node IP stays the loopback address
AUTH_ENV = "RAY_AUTH_MODE"
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


@contextmanager
def _one_machine() -> Any:
    """While a local instance starts: Ray's node IP stays 127.0.0.1, in this process and the ones it spawns.

    ``get_node_ip_address`` reads ``ray_constants.ENABLE_RAY_CLUSTER``, which Ray computes from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported; Ray may be imported already, so both are set.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(ONE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ONE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ONE_MACHINE_ENV, None)
        else:
            os.environ[ONE_MACHINE_ENV] = saved_env


def _private_token() -> None:
    """Ray writes its auth token with the default umask (world-readable): keep it to its owner."""
    try:
        mode = TOKEN_FILE.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            TOKEN_FILE.chmod(stat.S_IRUSR | stat.S_IWUSR)
    except OSError:
        pass


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def init_ray(
    address: str | None, num_cpus: int | None, gpus_per_trial: float = 0.0, *, env: Mapping[str, str] | None = None
) -> bool:
    """Start a local Ray instance (or connect to ``address``); True when this call started it.

    ``gpus_per_trial`` is accepted for callers that pass it (the local instance detects the GPUs itself);
    ``env``: more environment variables for the trials' workers.
    """
    import ray

    # CheckpointConfig(num_to_keep=1) makes Tune snapshot the experiment after every reported checkpoint, which a
    # resume wants (the snapshot is never behind the trials' checkpoints); Tune warns each time: hush that.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    # Workers import search.trainable and csl by name: make this checkout importable wherever they start.
    # Ray Train's workers of a trial (search.train_trial) start as new processes that import torch: 60 s, Train's
    # default wait for them, is too short on a busy 2-core machine.
    train_wait = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                                                           "600")}
    runtime_env = {"env_vars": {"PYTHONPATH": _pythonpath(), **train_wait, **(env or {})}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return True
    before = set(reaper.children(os.getpid())) if reaper.available() else None
    with _one_machine():
        # "local": always a new instance, never one that `ray start` left running on this machine.
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=False,
                 runtime_env=runtime_env)
    if os.environ.get(AUTH_ENV, "token").lower() != "disabled":  # unset: Ray 2.60 turns token auth on
        _private_token()
    if before is not None:
        start_reaper(before)
    return True


def start_reaper(before: set[int]) -> subprocess.Popen | None:
    """Watch the processes this driver started since it had the children ``before`` (the local Ray instance)."""
    roots = sorted(set(reaper.children(os.getpid())) - before)
    if not roots:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "search.reaper", str(os.getpid()), *map(str, roots)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )  # fmt: skip

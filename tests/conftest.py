"""Fixtures of the search tests: a real MLflow tracking server and a two-node Ray cluster on loopback.

Both run as child processes in their own process group (``start_new_session``); teardown stops exactly that
group, never processes found by name (other people's Ray and MLflow may run on the same machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def search_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m search`` child: this checkout importable, Ray as csl-search sets it up (a local
    instance on loopback with token auth)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A local Ray instance whose workers import this checkout (``search_env``), shared by a test module's searches
    (``run_search`` leaves alone an instance it did not start); stopped, and the environment restored, after."""
    import ray

    from search.local_ray import init_ray

    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "RAY_AUTH_MODE")}
    os.environ["PYTHONPATH"] = search_env()["PYTHONPATH"]
    os.environ.pop("RAY_AUTH_MODE", None)  # as csl-search starts Ray: token auth on
    started = init_ray(None, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL what is left of that group."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = process.pid
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its group may still hold children (Ray workers): make sure.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, one worker), shared by the whole session."""
    folder = Path(tempfile.mkdtemp(prefix="csl-mlflow-"))
    port = free_port()
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed in teardown
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # about 15 s on an idle machine; minutes when the cores are shared
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                log_tail = (folder / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server not healthy after 300 s: {log_tail}")
            time.sleep(0.5)
        yield uri
    finally:
        stop_group(process, grace_s=3)
        log.close()


def _ray_start(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", *args],
        env=dict(env), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster on loopback (head + one worker node, 1 CPU each); yields the head's address.

    Each node runs ``ray start --block`` in its own process group, so teardown stops exactly these nodes.
    """
    import ray  # noqa: F401 - fail early if Ray is missing

    temp = Path(tempfile.mkdtemp(prefix="cslr", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    env = search_env(RAY_AUTH_MODE="disabled")  # two `ray start` nodes on loopback, no token to hand around
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    head = _ray_start(
        ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", str(temp / "head"),
         "--include-dashboard", "false", *common], env, temp / "head.log",
    )  # fmt: skip
    nodes = [head]
    try:
        _wait_for_nodes(address, 1, head, temp / "head.log", env)
        worker = _ray_start(
            ["--address", address, "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp / "worker"), *common],
            env, temp / "worker.log",
        )  # fmt: skip
        nodes.append(worker)
        _wait_for_nodes(address, 2, worker, temp / "worker.log", env)
        yield address
    finally:
        for process in reversed(nodes):
            stop_group(process, grace_s=5)


def _wait_for_nodes(address: str, count: int, process: subprocess.Popen, log: Path, env: Mapping[str, str]) -> None:
    # A node counts once it is alive *and* its CPU shows in the cluster's available resources: under load the
    # scheduler can see a new node seconds before its resources, and then places every trial on the head.
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "alive = sum(1 for n in ray.nodes() if n['Alive']); "
        "print(min(alive, int(ray.available_resources().get('CPU', 0))))"
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-3000:]}")
        out = subprocess.run(
            [sys.executable, "-c", code, address], env=dict(env), capture_output=True, text=True, timeout=60
        )
        lines = out.stdout.strip().splitlines()
        if out.returncode == 0 and lines and int(lines[-1]) >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"Ray cluster at {address} did not reach {count} nodes: {log.read_text()[-3000:]}")

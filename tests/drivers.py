"""Helpers of the reliability tests: real ``csl-search`` drivers in their own sessions, watched from outside.

Nothing is mocked: a driver is a ``python -m search`` child process (its own session, so its Ray instance can be
found and cleaned up by session id), signals are real signals, the tracking store is the session's MLflow server
(``tests/conftest.py``) unless a test needs a fresh SQLite store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import REPO, search_env, stop_group

# The 1/16-wide ResNet-18 on 64 images of the embedded data: an epoch takes about a second on one core.
TINY_FIXED = """\
  method: simclr
  encoder: resnet18
  width: 0.0625
  proj_dim: 16
  proj_hidden: 32
  batch_size: 16
  train_limit: 64
  test_limit: 32
  knn_k: 10
  seed: 0
  device: cpu
"""


def space_text(name: str, *, epochs: int, samples: int, params: str = "  lr: {loguniform: [3.0e-4, 3.0e-3]}\n",
               fixed: str = TINY_FIXED, budget: str = "") -> str:  # fmt: skip
    return (f"name: {name}\nmetric: ssl_loss\nmode: min\n"
            f"budget: {{epochs: {epochs}, grace_period: 1, num_samples: {samples}{budget}}}\n"
            f"fixed:\n{fixed}params:\n{params}")  # fmt: skip


class Driver:
    """A ``python -m search ARGS`` child in its own session, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "search", *args], cwd=REPO, env=env or search_env(), stdout=self._file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        if not self._file.closed:
            self._file.flush()
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver still running after {timeout} s:\n{self.text()[-3000:]}") from None

    def stop(self) -> None:
        """Whatever is left of the driver's session (its Ray instance if the reaper has not taken it yet)."""
        stop_group(self.process, grace_s=3)
        self._file.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, driver: Driver | None = None,
               poll: float = 0.1) -> Any:  # fmt: skip
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` (and the driver's log tail)."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.process.poll() is not None:
            raise AssertionError(f"driver exited ({driver.process.returncode}) before {what}:\n{driver.text()[-3000:]}")
        if time.time() > deadline:
            tail = driver.text()[-3000:] if driver is not None else ""
            raise AssertionError(f"not within {timeout} s: {what}\n{tail}")
        time.sleep(poll)


def session_pids(sid: int) -> set[int]:
    """The processes of a session (a driver started with ``start_new_session`` and everything it spawned)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of ``pids`` holds (``/proc/net/tcp*``)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            found.append((_address(address, v6), int(port, 16), owner[inode]))
    return found


def _address(hex_address: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_address)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped) if address.ipv4_mapped else str(address)

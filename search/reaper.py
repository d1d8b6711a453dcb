"""``python -m search.reaper DRIVER_PID ROOT_PID...``: take a local Ray instance down with its driver.

Started by ``search.local_ray.init_ray`` with the processes that ``ray.init`` spawned (gcs_server, raylet, the
monitors). Twice a second it notes those roots and all their descendants (Ray's agents and workers are the
raylet's children); once the driver is gone (killed, even by SIGKILL: this process is then re-parented) or every
root has exited (``ray.shutdown``), it kills every noted process that still runs, identified by pid and start
time (never by name), and exits. Without it Ray's agents outlive a killed driver by about a minute.

Reads ``/proc`` (Linux, like Ray's own fate-sharing); elsewhere no reaper is started.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5
PROC = Path("/proc")


def available() -> bool:
    return (PROC / str(os.getpid()) / "stat").exists()


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state letter) of a process, None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name in parentheses may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def processes() -> dict[int, tuple[int, int, str]]:
    """Every visible process: pid -> (parent pid, start time, state)."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                found[int(entry.name)] = stat
    return found


def children(pid: int) -> dict[int, int]:
    """The live children of ``pid``: pid -> start time."""
    return {child: start for child, (parent, start, state) in processes().items() if parent == pid and state != "Z"}


def _family(roots: dict[int, int], table: dict[int, tuple[int, int, str]]) -> dict[int, int]:
    """``roots`` that still run (same start time) and all their descendants: pid -> start time."""
    found = {pid: start for pid, start in roots.items() if pid in table and table[pid][1] == start}
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, _) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def main(argv: list[str]) -> int:
    driver = int(argv[0])
    table = processes()
    roots = {pid: table[pid][1] for pid in map(int, argv[1:]) if pid in table}
    noted: dict[int, int] = {}
    while True:
        table = processes()
        noted.update(_family(roots, table))
        running = [pid for pid, start in roots.items() if pid in table and table[pid][1] == start
                   and table[pid][2] != "Z"]  # fmt: skip
        if os.getppid() != driver or not running:
            break
        time.sleep(POLL_S)
    for pid, start in noted.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start and stat[2] != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

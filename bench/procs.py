"""CPU time and resident memory of a process and its descendants, read from /proc (Linux).

A service is measured as its process tree, so a server that forks workers (the peer's
`--num_workers 2`) counts them all. Children that already exited are not counted: the
benchmark reads the trees while everything runs.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return raw[raw.rindex(")") + 2 :].split()


def _children() -> dict[int, list[int]]:
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            by_parent.setdefault(int(fields[1]), []).append(int(entry))
    return by_parent


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    by_parent = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(by_parent.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of the processes, in seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime and stime are fields 14 and 15 of /proc/<pid>/stat (12 and 13 here).
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of the processes, summed (shared pages count once per process)."""
    total = 0
    for pid in pids:
        try:
            resident = Path(f"/proc/{pid}/statm").read_text().split()[1]
        except (OSError, IndexError):
            continue
        total += int(resident) * _PAGE
    return total


def machine() -> str:
    """The CPU model and the number of CPUs this process may use."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        ram = f", {int(memory) / 1024 / 1024:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        ram = ""
    return f"{model}, {len(os.sched_getaffinity(0))} CPUs (nproc){ram}"

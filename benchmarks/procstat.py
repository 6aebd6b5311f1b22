"""What the benchmarks read about a process and the machine, written once.

CPU time (utime + stime of every thread, from ``/proc/PID/stat``), resident memory
(``VmRSS`` / ``VmHWM`` from ``/proc/PID/status``) and the load average.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_reaped(pid: int) -> float:
    """utime + stime of ``pid`` plus the CPU time of the children it has reaped (``cutime``,
    ``cstime``): a User-Mode Linux kernel reaps its guest's exited processes."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` now, in KiB (0 if it is gone)."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """The highest resident memory ``pid`` has had, in KiB (``VmHWM``)."""
    return _status_kib(pid, "VmHWM")


def load() -> str:
    """The load averages (1, 5, 15 min) and the number of CPUs, for the report's head."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"

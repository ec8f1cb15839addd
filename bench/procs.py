"""Process figures from /proc: CPU time and resident memory of a process tree, machine CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """ppid -> pids, for every process now."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx's workers, sniproxy's helper, ...)."""
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(kids.get(current, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), plus the reaped children's."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the name: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14.
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / TICKS


def tree_cpu(pid: int) -> float:
    return cpu_seconds(tree(pid))


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """The sum of VmRSS over ``pid`` and its descendants."""
    return sum(rss_bytes(p) for p in tree(pid))


@dataclass(frozen=True)
class MachineCPU:
    """Aggregate CPU counters of the machine (/proc/stat, in seconds)."""

    busy: float  # user + nice + system (what processes ran)
    softirq: float  # interrupts, mostly loopback networking here
    steal: float  # taken by the hypervisor
    total: float

    @staticmethod
    def now() -> MachineCPU:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
        total = user + nice + system + idle + iowait + irq + softirq + steal
        return MachineCPU(
            busy=(user + nice + system) / TICKS,
            softirq=(irq + softirq) / TICKS,
            steal=steal / TICKS,
            total=total / TICKS,
        )

    def __sub__(self, other: MachineCPU) -> MachineCPU:
        return MachineCPU(
            self.busy - other.busy,
            self.softirq - other.softirq,
            self.steal - other.steal,
            self.total - other.total,
        )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"

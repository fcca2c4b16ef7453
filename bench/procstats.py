"""What a process used, read from /proc by the process itself: imports nothing heavy, because
it is loaded into the job's parent and workers whose memory it measures."""

from __future__ import annotations

import json
import os
import time


def _kib(text: str, field: str) -> int:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def own_stats(role: str) -> dict:
    """This process's peak and current resident set (VmHWM, VmRSS), its private memory (USS)
    and proportional share (PSS) now, and its CPU seconds; sizes in KiB."""
    with open("/proc/self/status") as f:
        status = f.read()
    try:
        with open("/proc/self/smaps_rollup") as f:
            rollup = f.read()
    except OSError:
        rollup = ""
    times = os.times()
    return {
        "role": role, "pid": os.getpid(), "at": time.time(),
        "vm_hwm_kib": _kib(status, "VmHWM"), "vm_rss_kib": _kib(status, "VmRSS"),
        "uss_kib": _kib(rollup, "Private_Clean") + _kib(rollup, "Private_Dirty"),
        "pss_kib": _kib(rollup, "Pss"),
        "cpu_user_s": times.user, "cpu_system_s": times.system,
    }


def write_stats(directory: str, role: str, **extra) -> None:
    """Write own_stats() (plus `extra`) to `directory/<role>-<pid>.json`."""
    stats = own_stats(role) | extra
    path = os.path.join(directory, f"{role}-{stats['pid']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(stats, f)
    os.replace(path + ".tmp", path)


def read_stats(directory: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                out.append(json.load(f))
    return out

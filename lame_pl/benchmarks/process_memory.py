"""What a Linux process holds in memory now and at its peak, for the CPU memory figures of the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path


def proc_status_mib(field: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB.

    Raises:
        RuntimeError: When the field is missing (not a Linux process).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this tool measures Linux processes")


def lifetime_peak_rss_mib() -> float:
    """The process's lifetime peak resident size (``ru_maxrss``) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_high_water_mark() -> bool:
    """Resets ``VmHWM`` to the resident size now; False where ``clear_refs`` is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def malloc_trim() -> bool:
    """Hands freed heap memory back to the kernel (glibc), so that RSS counts what is alive."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    return True

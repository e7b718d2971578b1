"""Peak memory per phase of a long job (Linux: the kernel's resettable high-water mark).

``PhasePeaks.mark(name)`` records the process's peak resident set since the previous mark and starts a new
phase. On Linux the peak is ``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs``; where that is not
possible (another OS, a locked-down ``/proc``) the recorded figure is the process's peak so far
(``ru_maxrss``), an upper bound, and ``exact`` is False.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """The peak resident set (bytes) since the process started or the last reset."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak() -> bool:
    """Start a new high-water mark at the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak RSS (MiB) of each phase, in order: ``mark("read")`` closes the phase that began at the previous
    mark (or at construction)."""

    def __init__(self) -> None:
        self.exact = reset_peak()
        self.mib: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.mib[name] = round(peak_rss_bytes() / 2**20, 1)
        self.exact = reset_peak() and self.exact

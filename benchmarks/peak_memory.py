"""Peak resident memory of a piece of work, for the benchmarks (Linux /proc, CPU runs).

Large tensors are mmap-ed and returned to the kernel when freed, so the peak resident set size
(VmHWM) follows tensor memory. Resetting the kernel's peak counter (``/proc/self/clear_refs`` = 5)
after set-up lets one process measure the peak of only the work that follows.
"""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak-RSS counter to the current RSS; returns that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status_kib("VmRSS")

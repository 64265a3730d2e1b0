"""Peak resident memory of this process, and its value right after PyTorch's import.

`llama2/__init__.py` imports this module first, so `TORCH_IMPORT_PEAK_RSS_MB` is the
process's memory with PyTorch loaded and little else: the baseline that `llama2 bench`
reports memory above (importing PyTorch alone takes ~220 MB, more than a small model).
"""

from __future__ import annotations

import sys


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (None where the platform does not say)."""
    for measure in (_linux_peak_mb, _rusage_peak_mb, _psutil_peak_mb):
        peak = measure()
        if peak is not None:
            return peak
    return None


def _linux_peak_mb() -> float | None:
    """VmHWM, the high-water mark of this process's own memory (Linux).

    Preferred to getrusage's ru_maxrss, which Linux carries over from the parent across
    fork and exec: a child of a big process (a test runner) would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rusage_peak_mb() -> float | None:
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere


def _psutil_peak_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20  # Windows reports the peak working set


def _peak_after_importing_torch() -> float | None:
    import torch  # noqa: F401  (the baseline is this import's memory)

    return peak_rss_mb()


TORCH_IMPORT_PEAK_RSS_MB = _peak_after_importing_torch()

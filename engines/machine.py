"""What machine a benchmark ran on, how loaded it was, and how much memory a step took (no torch).

The machine description is hostname-free (CPU model, core counts, memory, GPU name) so a results
JSON can be committed; ``machine_key`` is the "machine kind" a latency baseline is keyed by.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time
from types import TracebackType
from typing import Any

MB = 2**20


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name via nvidia-smi, or None (no torch import needed)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def machine_info() -> dict[str, Any]:
    """CPU model, logical/physical cores, usable cores (affinity), memory, GPU, OS. No hostname."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu_model": cpu_model(), "logical_cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False), "usable_cores": usable,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu_name(),
            "os": f"{platform.system()} {platform.release()}", "arch": platform.machine()}
    info["machine_key"] = machine_key(info)
    return info


def machine_key(info: dict[str, Any]) -> str:
    """The machine kind a baseline is valid for: CPU model, usable cores, GPU."""
    return f"{info['cpu_model']} | {info['usable_cores']} cores | gpu: {info['gpu'] or 'none'}"


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def process_peak_rss_bytes() -> int | None:
    """The whole process's peak resident set (getrusage ru_maxrss; kB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


class PeakRssSampler:
    """``with PeakRssSampler() as s: ...``: RSS before, peak during (a thread polls psutil every
    ``interval`` s), and after. Used around loading + warming up one artifact, never while timing."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.before, self.peak, self.after = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRssSampler:
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.after = rss_bytes()
        self.peak = max(self.peak, self.after)

    def to_json(self) -> dict[str, float]:
        return {"rss_before_mb": round(self.before / MB, 1), "peak_rss_mb": round(self.peak / MB, 1),
                "peak_rss_delta_mb": round((self.peak - self.before) / MB, 1),
                "resident_delta_mb": round((self.after - self.before) / MB, 1)}


class OtherLoadMeter:
    """CPU used by *other* processes while a block runs, in cores: (system busy time - this process's
    CPU time) / wall time. A clean benchmark has this near 0; above ~0.3 the numbers are suspect."""

    def __enter__(self) -> OtherLoadMeter:
        self._start = self._snapshot()
        self.other_cores = 0.0
        return self

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        import psutil

        sys_t, own = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        return time.monotonic(), busy, own.user + own.system

    def __exit__(self, *exc: object) -> None:
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._snapshot()
        self.other_cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9))

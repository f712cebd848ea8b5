"""Peak memory: of this process per scenario, of child processes, and of the GPU.

Host: Linux keeps a process's peak resident set (``VmHWM`` in ``/proc/self/status``) and lets a
process reset it by writing ``5`` to ``/proc/self/clear_refs``; resetting before each scenario
gives that scenario's own peak rather than the process's lifetime peak. Where that is not
possible the lifetime peak (``ru_maxrss``) is reported and labelled as such (``scope``), never
passed off as a per-scenario number.

Children: ``os.wait4`` returns the resource usage of exactly the child it reaped, so each
``talkstream render`` run gets its own peak RSS (``RUSAGE_CHILDREN`` would give the maximum over
all children so far).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# ru_maxrss is in KiB on Linux, bytes on macOS.
_RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


@dataclass(frozen=True)
class HostPeak:
    """Peak resident memory and what it covers: ``scenario`` (reset at its start) or ``process``."""

    bytes: int
    scope: str


def _status_kib(key: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_host_peak() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the OS does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def host_peak(reset_done: bool) -> HostPeak:
    """Peak RSS since the last successful ``reset_host_peak()`` (else over the process's life)."""
    kib = _status_kib("VmHWM")
    if reset_done and kib is not None:
        return HostPeak(kib * 1024, "scenario")
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RU_MAXRSS_UNIT
    return HostPeak(int(usage), "process")


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> dict[str, int] | None:
    """Peak bytes allocated and reserved by torch's caching allocator since the last reset."""
    if device.type != "cuda":
        return None
    import torch

    return {
        "allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit status, its own peak RSS, wall time."""

    returncode: int
    max_rss_bytes: int
    wall_s: float


def run_child_measuring_rss(
    cmd: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None = None
) -> ChildRun:
    """Run ``cmd`` to completion, stdout and stderr to ``log_path``; measure its peak RSS.

    Raises:
        subprocess.TimeoutExpired: the child ran past ``timeout_s`` (it is killed first).
    """
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = t0 + timeout_s
        while True:
            # WNOHANG polling, not a blocking wait4: the timeout must stay enforceable.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            time.sleep(0.05)
    # We reaped the child ourselves; tell Popen so it does not try again.
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        returncode=proc.returncode,
        max_rss_bytes=int(usage.ru_maxrss * _RU_MAXRSS_UNIT),
        wall_s=time.perf_counter() - t0,
    )

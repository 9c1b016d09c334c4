"""Measurements in a fresh child process: its JSON result and its peak RSS seen from outside.

A model measured in the bench's own process would share its heap (torch, other variants): peak
resident memory is only meaningful per process, so every variant runs in its own child and the
child reports its own high-water mark (VmHWM). The kernel's ``ru_maxrss`` that ``os.wait4``
returns is no use here: Linux carries it across fork and exec, so a child started by a parent
holding 700 MB reports at least 700 MB whatever it did itself; it is kept as "ru_maxrss_mb".
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import threading
from typing import Any

from ..errors import TernvlmError


class ChildCrash(TernvlmError):
    """The measuring child died of a signal (not our timeout)."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (what the report shows)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def status_mb(key: str) -> float:
    """A field of /proc/self/status in MB (VmRSS, VmHWM); NaN where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_child(cmd: list[str], what: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``cmd``, parse the JSON object on its last stdout line, add "peak_rss_mb".

    The child must report "vm_hwm_mb" (/proc/self/status VmHWM at its end); that becomes
    "peak_rss_mb". A child that does not gets NaN.

    Raises ChildCrash when the child dies of a signal, TernvlmError on a timeout, a non-zero
    exit or no JSON (with the tail of its stderr).
    """
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    with tempfile.TemporaryFile() as err_file:  # a file, not a pipe: no deadlock on chatter
        # one BLAS thread: numpy's OpenBLAS workers would spin beside the threads we measure
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, env=env)
        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer is not None:
            timer.start()
        try:
            with proc.stdout:  # type: ignore[union-attr]
                out = proc.stdout.read()  # type: ignore[union-attr]
            _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves to get its rusage
        finally:
            if timer is not None:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read().decode(errors="replace").strip()
    if killed.is_set():
        raise TernvlmError(f"{what} child killed after {timeout_s:g} s: {err[-2000:]}")
    if proc.returncode < 0:
        why = f"signal {-proc.returncode}"
        raise ChildCrash(f"{what} child crashed ({why}): {err[-2000:]}", why)
    if proc.returncode != 0:
        raise TernvlmError(f"{what} child failed (exit {proc.returncode}): {err[-2000:]}")
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as e:
        raise TernvlmError(f"{what} child printed no JSON result: {out[-500:]!r}") from e
    result["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB; includes the parent's, see above
    result["peak_rss_mb"] = float(result.get("vm_hwm_mb", float("nan")))
    return result

"""What a latency number is only valid for: versions, threads and machine."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import resource
from pathlib import Path

PACKAGES = ("colln", "numpy", "torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt", "tensorrt_rtx")


def machine_id() -> str:
    """Baseline file stem for this machine: ``$COLLN_MACHINE``, else CPU model and core count
    (ratios carry over between machines of one kind, not across kinds)."""
    if os.environ.get("COLLN_MACHINE"):
        return os.environ["COLLN_MACHINE"]
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or platform.machine()
    return f"{slug}-{os.cpu_count()}cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# The instructions the runtimes choose int8, bf16 and fp16 kernels by: a figure measured with AMX
# does not carry to a CPU with VNNI only.
CPU_FLAGS = ("avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags(
    cpuinfo: Path | None = None,
) -> dict[str, bool] | None:
    """Which of :data:`CPU_FLAGS` the CPU has, from the first ``flags`` line of ``cpuinfo``
    (None: /proc/cpuinfo); None where that file or line is missing (not Linux)."""
    try:
        text = (cpuinfo or Path("/proc/cpuinfo")).read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.split(":", 1)[0].strip() == "flags"), None)
    if line is None or ":" not in line:
        return None
    present = set(line.split(":", 1)[1].split())
    return {flag: flag in present for flag in CPU_FLAGS}


def describe_cpu_flags(
    flags: dict[str, bool] | None,
) -> str:
    """``flags avx512_vnni avx_vnni (no avx512_bf16 ...)`` for a report; ``flags not recorded`` for None."""
    if flags is None:
        return "flags not recorded"
    has = [name for name, present in flags.items() if present]
    lacks = [name for name, present in flags.items() if not present]
    return f"flags {' '.join(has) or 'none of ' + ' '.join(CPU_FLAGS)}" + (f" (no {' '.join(lacks)})" if has and lacks else "")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a measurement depends on."""
    found = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
    return found


def environment(
    backend: str,
    threads: int | None,
    load_before: tuple[float, float, float] | None = None,
) -> dict:
    """Versions, threads and machine. The load averages before and after say how busy the machine was."""
    return {
        "machine": machine_id(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "backend": backend,
        "threads": threads or "backend default",
        "versions": versions(),
        "loadavg_before": list(load_before) if load_before else None,
        "loadavg_after": list(os.getloadavg()),
    }


def available_memory() -> int | None:
    """Bytes this process can still allocate, the least of what the machine has free
    (``MemAvailable``), the address-space limit left (``ulimit -v``) and the cgroup's limit left
    (a container's); ``None`` when none of them can be read."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        found.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
            status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            found.append(limit - int(status["VmSize"].split()[0]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        most = (cgroup / "memory.max").read_text().strip()
        if most != "max":
            found.append(int(most) - int((cgroup / "memory.current").read_text()))
    return max(min(found), 0) if found else None

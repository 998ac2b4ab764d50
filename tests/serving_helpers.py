"""Shared by the serving tests (test_triton, test_serve, test_docker): digit images, free loopback
ports, and a server process that is started, awaited and stopped cleanly."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from colln.models.bundled import load_split

HOST = "127.0.0.1"


def digit_images(
    count: int,
) -> np.ndarray:
    """``count`` preprocessed test-split digits, float32 [count, 3, 32, 32]."""
    from colln.data import preprocess
    from colln.models.registry import load_model

    split = load_split("test")
    return preprocess(split.images[:count], load_model("digits_vit", "random")).numpy()


def free_ports(
    count: int,
) -> list[int]:
    """Free loopback ports below the kernel's ephemeral range.

    A port 0 hands out is an ephemeral one: in the seconds before the server binds it, any outgoing
    connection on the machine (or the server's own bind(0) for Triton's private ports) may take it.
    Ports outside the range are never handed out that way.
    """
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    span = (10000, low) if low > 11000 else (high + 1, 65536)
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*span)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def wait_ready(
    proc: subprocess.Popen,
    url: str,
    timeout: float = 120.0,
) -> None:
    """Poll Triton's /v2/health/ready until it answers, the process dies, or ``timeout`` passes."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; its log ends:\n{log_tail(proc)}")
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f}s; its log ends:\n{log_tail(proc)}")


def stop(
    proc: subprocess.Popen,
    sig: int = signal.SIGTERM,
    timeout: float = 60.0,
) -> int:
    """Send ``sig`` and wait for the exit code; kill (and fail) if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def launch(
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``argv`` with stdout and stderr in ``log`` (kept on the process for :func:`log_tail`)."""
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    proc.log = log
    return proc


def log_tail(
    proc: subprocess.Popen,
    lines: int = 40,
) -> str:
    """The last ``lines`` of a :func:`launch`-ed process's log: why a server died, in a failing test's message."""
    log = getattr(proc, "log", None)
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

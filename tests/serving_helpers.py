"""Shared by the serving tests (test_triton, test_serve, test_docker): digit images, free loopback
ports, and a server process that is started, awaited and stopped cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from colln.models.digits import load_split

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
    """Ports the kernel hands out for port 0 on loopback, all held until every one is picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f}s")


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
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

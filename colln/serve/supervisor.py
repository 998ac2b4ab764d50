"""colln-serve's supervisor: Triton (PyTriton's bundled ``tritonserver``) on private loopback ports,
behind the guard (:mod:`colln.serve.guard`) on the public ones, restarted whenever it or a model
worker fails. Kept apart from :mod:`colln.serve.triton_model`, which Triton's python-backend stubs import."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import aiohttp

from colln.errors import ServeError
from colln.serve.guard import Guard, ModelLimits, probe_request

# How often the supervisor looks at Triton's processes, and runs a real inference per model.
WATCH_INTERVAL_S = 0.25
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 30.0
START_TIMEOUT_S = 180.0
# Restarts in a row that may fail before colln-serve gives up (exit 2).
MAX_FAILED_STARTS = 5
SHM_PREFIX = "colln-serve-"


def log(message: str) -> None:
    print(f"colln-serve: {message}", file=sys.stderr, flush=True)


def port_free(
    host: str,
    port: int,
) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def private_ports(
    count: int,
    public: Collection[int],
) -> list[int]:
    """Free loopback ports for Triton itself (only the guard listens on the public ones).

    The public ports are checked free but not yet bound when this runs, so the kernel may hand one
    of them out here: such a port is held aside and another drawn.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) not in public:
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def children(
    pid: int,
) -> set[int]:
    """Pids whose parent is ``pid`` (Triton's python-backend stubs), from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def running(
    pid: int,
) -> bool:
    """``pid`` exists and is not a zombie (a killed stub stays one until Triton reaps it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def remove_shm(
    prefix: str,
) -> None:
    """Remove the python backend's shared-memory regions named ``prefix*`` (a killed Triton leaves them)."""
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            region.unlink()


def remove_stale_shm() -> None:
    """Regions of colln-serve runs whose process is gone (``colln-serve-<pid>-...``)."""
    for region in Path("/dev/shm").glob(f"{SHM_PREFIX}*"):
        pid = region.name[len(SHM_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                region.unlink()


class TritonProcess:
    """One run of PyTriton's bundled ``tritonserver`` on private loopback ports, in its own process
    group (stubs included) so that it can be stopped or killed whole."""

    def __init__(
        self,
        repo: Path,
        workdir: Path,
        http_port: int,
        grpc_port: int,
        metrics: tuple[str, int],
        binary: str | None = None,
    ) -> None:
        """``binary``: a stock ``tritonserver`` with its own backends (the GPU image); default
        PyTriton's bundled one, given the python backend stub of this interpreter."""
        self.env = stub_environment(os.environ)
        if binary is None:
            from pytriton.triton import TRITONSERVER_DIST_DIR
            from pytriton.utils.distribution import get_libs_path, get_stub_path

            # The python backend looks for its stub beside itself: a backend directory with the stub
            # of this interpreter's version (PyTriton ships one per Python version).
            backend = workdir / "backends" / "python"
            backend.mkdir(parents=True, exist_ok=True)
            for item in (TRITONSERVER_DIST_DIR / "backends" / "python").iterdir():
                if item.is_file() and not (backend / item.name).exists():
                    (backend / item.name).symlink_to(item)
            stub = backend / "triton_python_backend_stub"
            if not stub.exists():
                shutil.copy2(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"), stub)
            binary = str(TRITONSERVER_DIST_DIR / "bin" / "tritonserver")
            bundled = [f"--backend-directory={workdir / 'backends'}", f"--cache-directory={TRITONSERVER_DIST_DIR / 'caches'}"]
            libs = [p for p in (self.env.get("LD_LIBRARY_PATH"), str(get_libs_path())) if p]
            self.env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
            self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        else:
            bundled = []
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}-"
        self.argv = [
            binary,
            f"--model-repository={repo}",
            *bundled,
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={metrics[0]}",
            f"--metrics-port={metrics[1]}",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(
        self,
        grace_s: float = 10.0,
    ) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``; remove its shared memory."""
        if self.proc is None:
            return
        group = self.proc.pid
        polite = ((signal.SIGTERM, grace_s),) if grace_s > 0 else ()
        for sig, wait in (*polite, (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
            if self.proc.poll() is not None and not _group_alive(group):
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # stubs that outlived their server
        self.proc = None
        remove_shm(self.shm_prefix)


def stub_environment(
    environ: Mapping[str, str],
) -> dict[str, str]:
    """Triton's environment: ``environ`` with this interpreter's libpython directory first on
    ``LD_LIBRARY_PATH``, so that the python-backend stub loads this libpython, not another one on the
    system (a mismatched one fails inside the stdlib). Only the child gets it: colln-serve's own
    environment stays as it was."""
    env = dict(environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])
    return env


def _die_with_parent() -> None:
    """In the child: SIGKILL when colln-serve dies, however it dies (no orphaned Triton)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _group_alive(
    group: int,
) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class Supervisor:
    """Runs Triton behind the guard; readiness is True only while Triton is up, every stub it started
    is alive and the last real inference of every model succeeded. Any failure: readiness False at
    once, a line in the log, Triton stopped (process group) and started again."""

    def __init__(
        self,
        triton: TritonProcess,
        http_port: int,
        names: list[str],
    ) -> None:
        self.triton = triton
        self.url = f"http://127.0.0.1:{http_port}"
        self.names = names
        self.ready = False
        self.stubs: set[int] = set()
        self.probes: dict[str, tuple[bytes, dict[str, str]]] = {}

    async def start(
        self,
        session,
        guard: Guard,
    ) -> str | None:
        """Start Triton and wait until every model answers a real inference; None when ready, else
        why not."""
        self.triton.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            if not self.triton.alive():
                return f"Triton exited with code {self.triton.proc.returncode} while starting"
            try:
                async with session.get(f"{self.url}/v2/health/ready") as answer:
                    if answer.status != 200:
                        continue
                limits = {}
                for name in self.names:
                    async with session.get(f"{self.url}/v2/models/{name}/config") as answer:
                        limits[name] = ModelLimits.from_config(await answer.json())
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
            guard.set_limits(limits)
            self.probes = {name: probe_request(limits[name]) for name in self.names}
            failure = await self.probe(session)
            if failure is None:
                self.stubs = children(self.triton.proc.pid)
                self.ready = True
                return None
        return f"Triton was not ready after {START_TIMEOUT_S:.0f}s"

    async def probe(
        self,
        session,
    ) -> str | None:
        """One real inference per model (zeros, batch 1); None if all answered, else what failed."""
        for name, (body, headers) in self.probes.items():
            try:
                timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
                async with session.post(
                    f"{self.url}/v2/models/{name}/infer", data=body, headers=headers, timeout=timeout
                ) as answer:
                    text = await answer.read()
                    if answer.status != 200:
                        return f"model {name} failed a probe inference ({answer.status} {text[:200].decode(errors='replace')})"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return f"model {name} did not answer a probe inference ({type(exc).__name__})"
        return None

    async def watch(
        self,
        session,
        stopping: asyncio.Event,
    ) -> str | None:
        """Until ``stopping`` is set (None) or something fails (what)."""
        next_probe = time.monotonic() + PROBE_INTERVAL_S
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), WATCH_INTERVAL_S)
            if stopping.is_set():
                return None
            if not self.triton.alive():
                return f"Triton exited with code {self.triton.proc.returncode}"
            gone = {pid for pid in self.stubs if not running(pid)}
            if gone:
                return f"model worker process {', '.join(map(str, sorted(gone)))} died"
            if time.monotonic() >= next_probe:
                failure = await self.probe(session)
                if failure:
                    return failure
                next_probe = time.monotonic() + PROBE_INTERVAL_S
        return None


async def run(
    repo: Path,
    workdir: Path,
    names: list[str],
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    tritonserver: str | None = None,
) -> signal.Signals | None:
    """Serve the models ``names`` of ``repo`` until SIGINT/SIGTERM/SIGHUP (see the module docstring);
    returns the signal that stopped it."""
    private_http, private_grpc = private_ports(2, public=(http_port, grpc_port, metrics_port))
    triton = TritonProcess(repo, workdir, private_http, private_grpc, (host, metrics_port), tritonserver)
    supervisor = Supervisor(triton, private_http, names)
    guard = Guard(f"127.0.0.1:{private_http}", f"127.0.0.1:{private_grpc}", ready=lambda: supervisor.ready)
    # aiohttp's body cap must be known before Triton reports the configs: the largest valid request.
    max_body = max(ModelLimits.from_config(_config_of(repo / name)).max_request_bytes() for name in names)
    stopping = asyncio.Event()
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        received.append(sig)
        stopping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)
    try:
        for start, port, option in ((guard.start_http, http_port, "--http-port"), (guard.start_grpc, grpc_port, "--grpc-port")):
            try:
                await start(host, port, max_body)
            except OSError as exc:
                raise ServeError(f"port {port} is in use ({option}): stop what listens there or pass another {option}") from exc
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await _supervise(supervisor, guard, session, stopping, host, (http_port, grpc_port, metrics_port))
    finally:
        supervisor.ready = False
        # The guard first: its keep-alive connections would hold Triton's exit for its whole timeout.
        await guard.stop()
        triton.stop()
    return received[0] if received else None


async def _supervise(
    supervisor: Supervisor,
    guard: Guard,
    session,
    stopping: asyncio.Event,
    host: str,
    ports: tuple[int, int, int],
) -> None:
    failed_starts, first = 0, True
    while not stopping.is_set():
        began = time.monotonic()
        why = await _first_of(supervisor.start(session, guard), stopping)
        if stopping.is_set():
            return
        if why is not None:
            # Killed by a signal while starting is a crash (seen: gRPC's epoll failing right after
            # the fork), not Triton refusing the repository: worth a retry even on the first start.
            crashed = (supervisor.triton.proc.returncode or 0) < 0 if supervisor.triton.proc is not None else False
            supervisor.triton.stop()
            failed_starts += 1
            if (first and not crashed) or failed_starts >= MAX_FAILED_STARTS:
                raise ServeError(f"{why}: Triton's log above says why")
            log(f"{why}; retrying ({failed_starts} of {MAX_FAILED_STARTS})")
            await asyncio.sleep(min(2.0**failed_starts, 30.0))
            continue
        failed_starts = 0
        if first:
            log(
                f"serving {', '.join(supervisor.names)} on http://{host}:{ports[0]} (grpc {ports[1]}, metrics {ports[2]}); "
                "Ctrl-C to stop"
            )
            first = False
        else:
            log(f"recovered: serving again ({time.monotonic() - began:.1f}s to restart)")
        why = await supervisor.watch(session, stopping)
        supervisor.ready = False
        if why is None:
            return
        log(f"{why}: not ready; restarting Triton")
        # Killed at once: a server with a dead worker only holds its exit for its exit timeout.
        supervisor.triton.stop(grace_s=0.0)


async def _first_of(
    work,
    stopping: asyncio.Event,
):
    """``await work``, unless ``stopping`` is set first (then None, ``work`` cancelled)."""
    task, stop = asyncio.ensure_future(work), asyncio.ensure_future(stopping.wait())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _config_of(
    model_dir: Path,
) -> dict:
    """The parts of the ``config.pbtxt`` colln wrote that the guard needs (before Triton runs)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)

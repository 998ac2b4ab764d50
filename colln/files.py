"""Writing files and directories whole or not at all: readers never see half an artifact, and a
failure (or Ctrl-C, SIGTERM, SIGHUP) leaves what was there before.

What ``force`` may replace: only a directory colln wrote (it holds the ``marker`` file of its kind:
``export.json``, ``results.json``, ``config.pbtxt``) or an empty directory; never the current
directory or one above it. A symlinked output is followed: the directory it points to is replaced
and the link is kept. Temp and old directories are named ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*``
beside the output; those of dead processes (a SIGKILL, a power cut) are removed by the next write
to the same output. The swap holds an exclusive lock on the parent directory, so concurrent
writers to one output each succeed in turn (the last one wins) without a race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from colln.errors import OutputExistsError, UsageError

# errno values that mean "this path cannot be written", not a bug: one line, exit 2.
PATH_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENOENT: "no such file or directory",
}
_SWAP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def path_problem(
    exc: OSError,
    path: Path | str,
    fix: str,
) -> UsageError:
    """``exc`` as colln's one line: what went wrong with ``path`` and ``fix``."""
    what = PATH_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
    path = Path(path)
    # What mkdir / mkdtemp's errno leaves unsaid: a file where a directory should be (EEXIST from
    # mkdir -p), a directory that takes no new files (/proc says ENOENT).
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if exc.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR) and existing is not None and not existing.is_dir():
        what = f"{display(existing)} is a file, not a directory"
    elif exc.errno == errno.ENOENT and existing == path:
        what = "it exists, and new files cannot be created in it"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space and run it again"
    return UsageError(f"cannot write {display(path)} ({what}): {fix}", stage="output")


def display(
    path: Path | str,
) -> str:
    """A path as printable text (a non-UTF-8 name shows its bytes escaped, not a crash)."""
    return os.fsencode(str(path)).decode("utf-8", errors="backslashreplace")


def atomic_write(
    path: Path,
    data: bytes | str,
) -> None:
    """Write ``path`` through a temp file beside it and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as exc:
        raise path_problem(exc, path, "choose a writable path") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise path_problem(exc, path, "choose a writable path") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def pid_alive(
    pid: int,
) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale(
    parent: Path,
    name: str,
) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` in ``parent`` whose process is gone."""
    for kind in ("tmp", "old"):
        for leftover in parent.glob(f".{name}.{kind}-*"):
            pid = leftover.name[len(f".{name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        leftover.unlink()


def check_writable_dir(
    directory: Path,
    fix: str,
) -> None:
    """Create ``directory`` if needed and make (and drop) a file in it: colln's one-line error naming
    the directory when that fails, before any long work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise path_problem(exc, directory, fix) from exc


def check_replaceable(
    out: Path,
    marker: str,
    option: str = "--out",
) -> None:
    """Refuse to replace anything colln did not write (see the module docstring), or what this
    process could not move away and delete (checked now, not after the work)."""
    if not out.is_dir():
        raise OutputExistsError(f"{display(out)} exists and is not a directory: choose another {option}")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise OutputExistsError(
            f"{display(out)} is the current directory or holds it: colln never replaces it; choose another {option}"
        )
    if not (out / marker).is_file() and any(out.iterdir()):
        raise OutputExistsError(
            f"{display(out)} is not empty and has no {marker}, so colln did not write it: colln replaces only its own "
            f"output or an empty directory; choose another {option}"
        )
    if not _removable(out):
        code = errno.EROFS if os.statvfs(out).f_flag & os.ST_RDONLY else errno.EACCES
        denied = OSError(code, os.strerror(code))
        raise path_problem(denied, out, f"it cannot be replaced by this user; choose another {option}, or make it writable")


def _removable(
    out: Path,
) -> bool:
    """Whether this process may move ``out`` within its parent and delete everything in it."""
    parent = out.parent.stat()
    owners = {0, parent.st_uid, out.stat().st_uid}
    if parent.st_mode & stat.S_ISVTX and os.geteuid() not in owners:
        return False  # a sticky parent (like /tmp) lets only owners rename
    directories = [out, *(p for p in out.rglob("*") if p.is_dir() and not p.is_symlink())]
    return all(os.access(d, os.W_OK | os.X_OK) for d in directories)


@contextlib.contextmanager
def _locked(
    directory: Path,
) -> Iterator[None]:
    """An exclusive lock on ``directory`` (flock on its descriptor: no lock file left behind), with
    SIGINT/SIGTERM/SIGHUP held back so that a swap is never cut in half."""
    fd = os.open(directory, os.O_RDONLY)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SWAP_SIGNALS)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Run native code that calls back into Python (PyTorch's exporter) with SIGINT, SIGTERM and
    SIGHUP held: one arriving meanwhile acts (its handler runs: colln's raise KeyboardInterrupt) when
    the block ends. Raised inside such a callback, the exception crosses C++ frames that cannot pass
    it on and the process aborts (``terminate called after throwing an instance of 'python_error'``,
    exit 134, the temp output left behind). A second signal acts at once. The main thread only (the
    one Python runs signal handlers in); signals ignored or handled outside Python stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: handler for sig in _SWAP_SIGNALS if (handler := signal.getsignal(sig)) not in (None, signal.SIG_IGN)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def hold(
        signum: int,
        frame: object,
    ) -> None:
        if held:  # asked twice: act now
            held.clear()
            restore()
            signal.raise_signal(signum)
            return
        held.append(signum)

    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        restore()
        if held:
            signal.raise_signal(held[0])


@contextlib.contextmanager
def atomic_dir(
    out: Path,
    force: bool = False,
    *,
    marker: str,
    option: str = "--out",
) -> Iterator[Path]:
    """Yield an empty temp dir beside ``out``; on success it replaces ``out``, on failure it is
    removed and ``out`` is left as it was. ``marker``: the file that makes an existing ``out``
    colln's own (the only kind ``force`` replaces, besides an empty directory); ``option``: the
    argument that names ``out``, for the error messages."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        target = out.resolve()
        if not target.exists() and not target.parent.is_dir():
            raise OutputExistsError(f"{display(out)} is a symlink to {display(target)}, which cannot be created: fix the link")
        out = target  # the link stays; what it points to is replaced
    if out.exists() and not force:
        raise OutputExistsError(f"{display(out)} already exists: pass --force to replace it, or {option} another directory")
    if out.exists():
        # Under the lock: a concurrent writer's swap leaves ``out`` missing for a moment.
        with _locked(out.parent):
            if out.exists():
                check_replaceable(out, marker, option)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
        # mkdtemp makes it 0700; an export is read by others (Triton containers, CI users).
        tmp.chmod(0o755)
    except OSError as exc:
        raise path_problem(exc, parent, f"choose a writable {option}") from exc
    old = None
    try:
        yield tmp
        with _locked(parent):
            # Checked again: another writer may have created or changed it meanwhile.
            if out.exists() and not force:
                raise OutputExistsError(f"{display(out)} was created meanwhile: pass --force to replace it")
            try:
                if out.exists():
                    check_replaceable(out, marker, option)
                    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=parent))
                    out.rename(old / "previous")
                try:
                    tmp.rename(out)
                except OSError:
                    if old is not None:
                        (old / "previous").rename(out)
                    raise
            except OSError as exc:
                raise path_problem(exc, out, f"choose a writable {option}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

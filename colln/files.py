"""Writing files and directories whole or not at all: readers never see half an artifact, and a
failure (or Ctrl-C) leaves what was there before."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from colln.errors import OutputExistsError, UsageError


def atomic_write(
    path: Path,
    data: bytes | str,
) -> None:
    """Write ``path`` through a temp file beside it and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror}): choose a writable path", stage="output") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror}): choose a writable path", stage="output") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(
    out: Path,
    force: bool = False,
) -> Iterator[Path]:
    """Yield an empty temp dir beside ``out``; on success it replaces ``out``, on failure it is
    removed and ``out`` is left as it was."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists: pass --force to replace it, or --out another directory")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose another --out")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        # mkdtemp makes it 0700; an export is read by others (Triton containers, CI users).
        tmp.chmod(0o755)
    except OSError as exc:
        raise UsageError(f"cannot write to {parent} ({exc.strerror}): choose a writable --out", stage="output") from exc
    try:
        yield tmp
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Export steps shared by the commands: write an export directory atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from colln.errors import OutputExistsError, UsageError
from colln.export.onnx import export_onnx, save_checked
from colln.export.spec import ONNX_FILE, ExportSpec
from colln.models.plan import KeepPlan
from colln.models.rewrite import get_plan

PRECISIONS = ("fp32", "fp16")


def default_out_dir(
    spec: ExportSpec,
    root: Path = Path("exports"),
) -> Path:
    keep = "-".join(f"{k:g}" for k in spec.keep) if isinstance(spec.keep, tuple) else f"{spec.keep:g}"
    suffix = "" if spec.precision == "fp32" else f"-{spec.precision}"
    return root / f"{spec.model}-{spec.metric}-keep{keep}{suffix}"


@contextlib.contextmanager
def atomic_output(
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


@dataclass(frozen=True)
class Exported:
    """A model exported into ``directory`` (which may still be the temp dir)."""

    directory: Path
    spec: ExportSpec
    plan: KeepPlan
    unpruned: nn.Module
    pruned: nn.Module


def export_into(
    spec: ExportSpec,
    directory: Path,
    unpruned: nn.Module | None = None,
) -> Exported:
    """Load, prune and export ``spec`` into an existing ``directory``: ``model.onnx`` + ``export.json``."""
    from colln.data import data_config

    if spec.precision not in PRECISIONS:
        raise UsageError(f"precision {spec.precision!r} is not supported: use {' or '.join(PRECISIONS)}")
    unpruned = unpruned if unpruned is not None else spec.load_unpruned()
    pruned = spec.prune(unpruned)
    plan = get_plan(pruned)
    spec = replace(spec, plan=plan.to_dict())
    input_size = tuple(data_config(unpruned)["input_size"])
    proto = export_onnx(
        pruned,
        Path(directory) / ONNX_FILE,
        input_size=input_size,
        opset=spec.opset,
        metadata={"colln.plan": plan.to_json(), "colln.spec": json.dumps(spec.to_dict())},
    )
    if spec.precision == "fp16":
        from colln.export.precision import to_fp16

        save_checked(to_fp16(proto), Path(directory) / ONNX_FILE)
    spec.write(directory)
    return Exported(directory=Path(directory), spec=spec, plan=plan, unpruned=unpruned, pruned=pruned)

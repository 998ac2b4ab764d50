"""The unpruned counterpart of an export, the speed baseline: the same model, weights, input size,
precision and opset at keep 1.0, exported once into a cache and reused while it matches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from torch import nn

from colln.export.artifact import GRAPH_REVISION, default_out_dir, export_into
from colln.export.quantize import RECIPE as INT8_RECIPE
from colln.export.spec import ONNX_FILE, SPEC_FILE, ExportSpec
from colln.files import atomic_dir

CACHE_DIR = ".colln-cache"


def default_cache(
    export_dir: Path,
) -> Path:
    return Path(export_dir).resolve().parent / CACHE_DIR


def unpruned_export(
    spec: ExportSpec,
    cache: Path,
    unpruned: nn.Module | None = None,
    calibration: np.ndarray | None = None,
) -> Path:
    """The export directory of ``spec``'s baseline in ``cache``, exported on first use (from the
    already loaded ``unpruned`` model when given). Its name is a hash of ``spec.unpruned()``, exactly
    what the baseline graph depends on, so exports that differ only in prune settings share it.
    ``calibration``: int8 only, the images the pruned export was calibrated on when they are not the
    default ones (see :func:`cached_export`)."""
    return cached_export(spec.unpruned(), cache, unpruned, name="keep1", calibration=calibration)


def cache_key(
    spec: ExportSpec,
    calibration: np.ndarray | None = None,
) -> str:
    """What a cached graph depends on: the spec, the graph colln writes for it and, for int8, the
    quantization recipe and the calibration images (``None``: the default ones)."""
    int8 = {}
    if spec.precision == "int8":
        int8["int8_recipe"] = INT8_RECIPE
        if calibration is not None:
            int8["calibration"] = hashlib.sha1(np.ascontiguousarray(calibration, dtype=np.float32).tobytes()).hexdigest()
    key = {**spec.to_dict(), "graph": GRAPH_REVISION, **int8}
    key.pop("artifacts")  # written after the graph; an IR is added to a cached export on use
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def cached_export(
    spec: ExportSpec,
    cache: Path,
    unpruned: nn.Module | None = None,
    name: str | None = None,
    calibration: np.ndarray | None = None,
) -> Path:
    """``spec`` exported into ``cache`` on first use and reused while its export.json matches
    (the int8 stack also needs the pruned fp32 counterpart of an int8 export). The directory is
    ``<model>-<name>-<cache_key>`` (``name`` default: the spec's default output name). int8 graphs
    are calibrated on ``calibration`` (``None``: the model's default validation images)."""
    key = cache_key(spec, calibration)
    out = Path(cache) / f"{spec.model}-{name}-{key}" if name else Path(cache) / f"{default_out_dir(spec).name}-{key}"
    if (out / ONNX_FILE).is_file() and ExportSpec.read(out) == spec:
        return out
    with atomic_dir(out, force=True, marker=SPEC_FILE, option="--cache") as tmp:
        export_into(spec, tmp, unpruned, calibration if spec.precision == "int8" else None)
    return out


def unpruned_engine(
    export_dir: Path,
    base_dir: Path,
) -> None:
    """Give the cached unpruned export a TensorRT engine with the pruned engine's batch profile
    (built once, then reused while it matches)."""
    from colln.export.manifest import engine_artifact
    from colln.export.tensorrt import ENGINE_FILE, build_engine

    profile = engine_artifact(export_dir).extra["profile"]
    if (base_dir / ENGINE_FILE).is_file() and engine_artifact(base_dir).extra["profile"] == profile:
        return
    build_engine(base_dir, batch_min=profile["min"][0], batch_opt=profile["opt"][0], batch_max=profile["max"][0])

"""TensorRT engines for an export directory, through polygraphy's loaders.

``build_engine`` parses ``model.onnx`` as a strongly typed network (the precision is the graph's:
fp32, or the fp16 graph of ``--precision fp16``; TensorRT 11 has no weak typing), builds
``model.plan`` for one batch profile, reusing a timing cache, and writes ``model.plan.json`` (what
built it, for which GPU, precision, profile, keep plan) and ``model.plan.log`` (the builder log).

Full TensorRT is used when importable; otherwise TensorRT-RTX, whose builder runs without a GPU.
polygraphy drives the one its ``config.USE_TENSORRT_RTX`` names, read when its TensorRT backend is
imported and again in its loaders and runners: ``polygraphy_trt`` (around every use of that
backend, and inside each call of :func:`engine_runner`'s runner) turns it on while colln uses
TensorRT-RTX, when that is the only one installed and POLYGRAPHY_USE_TENSORRT_RTX does not say
otherwise, and back off after: a caller's own polygraphy keeps its choice.

Running an engine (and refusing a foreign one) is the runtime's job: ``colln.infer.runners``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from colln.errors import BackendUnavailableError, EngineError, ExportDirError, UsageError
from colln.export.spec import INPUT_NAME, ONNX_FILE, file_sha256
from colln.files import atomic_write, check_writable_dir, path_problem

if TYPE_CHECKING:
    from polygraphy.backend.base import BaseRunner

# The serialized TensorRT engine: TensorRT calls it a plan, colln keeps that word for the KeepPlan
# (the file names stay TensorRT's).
ENGINE_FILE = "model.plan"
ENGINE_META_FILE = "model.plan.json"
ENGINE_LOG_FILE = "model.plan.log"
FAILED_LOG_FILE = "model.plan.failed.log"
LABELS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
INSTALL_HINT = "pip install 'colln[trt]' (NVIDIA GPU machines) or 'colln[trt-rtx]' (builds engines without a GPU)"


@dataclass(frozen=True)
class TrtFlavour:
    """The TensorRT module polygraphy drives: ``tensorrt`` or ``tensorrt_rtx``."""

    name: str
    version: str
    module: ModuleType

    @property
    def label(self) -> str:
        return f"{LABELS[self.name]} {self.version}"


def trt_module() -> TrtFlavour:
    """The TensorRT flavour in use (``tensorrt`` when importable, else ``tensorrt_rtx``); polygraphy's
    switch is left as it was (use :func:`polygraphy_trt` around polygraphy's TensorRT backend)."""
    with polygraphy_trt() as flavour:
        return flavour


@contextlib.contextmanager
def polygraphy_trt() -> Iterator[TrtFlavour]:
    """polygraphy pointed at the TensorRT flavour in use while the block runs (import and call
    ``polygraphy.backend.trt`` inside it); its switch as it was after, so a caller's own polygraphy
    keeps its choice."""
    from polygraphy import config

    rtx = config.USE_TENSORRT_RTX or _prefer_tensorrt_rtx()
    with _polygraphy_switch(rtx):
        name = "tensorrt_rtx" if rtx else "tensorrt"
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError) as exc:
            if name == "tensorrt" and importlib.util.find_spec("tensorrt_rtx") is not None:
                # Something imported polygraphy's TensorRT backend for full TensorRT before colln could choose.
                raise BackendUnavailableError(
                    "polygraphy's TensorRT backend was imported for full TensorRT, which is not installed: "
                    "set POLYGRAPHY_USE_TENSORRT_RTX=1 to use TensorRT-RTX"
                ) from exc
            raise BackendUnavailableError(f"TensorRT is not installed ({name} cannot be imported): {INSTALL_HINT}") from exc
        yield TrtFlavour(name=name, version=module.__version__, module=module)


def _prefer_tensorrt_rtx() -> bool:
    """Whether to point polygraphy at TensorRT-RTX: it is the only TensorRT installed and neither the
    environment (POLYGRAPHY_USE_TENSORRT_RTX) nor an earlier import of polygraphy's TensorRT backend
    for full TensorRT has chosen."""
    loader = sys.modules.get("polygraphy.backend.trt.loader")
    return not (
        "POLYGRAPHY_USE_TENSORRT_RTX" in os.environ
        or (loader is not None and not loader.trt.is_installed())  # bound to the absent full TensorRT
        or not _only_tensorrt_rtx_installed()
    )


@functools.cache
def _only_tensorrt_rtx_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is not None


@functools.cache
def _tensorrt_rtx_lazy_module() -> ModuleType:
    """polygraphy's lazy TensorRT-RTX module (made once: it logs the module when first resolved)."""
    from polygraphy import config
    from polygraphy.mod.trt_importer import lazy_import_trt

    saved, config.USE_TENSORRT_RTX = config.USE_TENSORRT_RTX, True
    try:
        return lazy_import_trt()
    finally:
        config.USE_TENSORRT_RTX = saved


@contextlib.contextmanager
def _polygraphy_switch(
    rtx: bool,
) -> Iterator[None]:
    """polygraphy's TensorRT-RTX switch on for the block when ``rtx``; both it and the TensorRT
    module of polygraphy's dtype conversions as they were after."""
    from polygraphy import config

    if not rtx or config.USE_TENSORRT_RTX:
        yield
        return
    # polygraphy's dtype conversions (imported by every polygraphy runner) bound the TensorRT module
    # when they were imported, before the switch: rebind it, or no TensorRT-RTX dtype converts.
    datatypes = sys.modules.get("polygraphy.datatype.tensorrt")
    saved = datatypes.trt if datatypes is not None else None
    config.USE_TENSORRT_RTX = True
    if datatypes is not None:
        datatypes.trt = _tensorrt_rtx_lazy_module()
    try:
        yield
    finally:
        config.USE_TENSORRT_RTX = False
        if datatypes is not None:
            datatypes.trt = saved


def engine_runner(
    engine_path: Path,
    name: str,
    flavour: TrtFlavour,
) -> BaseRunner:
    """polygraphy's ``TrtRunner`` over a serialized engine, each of its calls (activate, infer,
    deactivate) made with polygraphy's switch pointed at ``flavour``, which polygraphy reads there."""
    rtx = flavour.name == "tensorrt_rtx"
    with _polygraphy_switch(rtx):
        from polygraphy.backend.trt import EngineFromPath, TrtRunner

    class ScopedTrtRunner(TrtRunner):
        def activate_impl(self) -> None:
            with _polygraphy_switch(rtx):
                super().activate_impl()

        def infer_impl(self, feed_dict: dict, *args: Any, **kwargs: Any) -> dict:
            with _polygraphy_switch(rtx):
                return super().infer_impl(feed_dict, *args, **kwargs)

        def deactivate_impl(self) -> None:
            with _polygraphy_switch(rtx):
                super().deactivate_impl()

    return ScopedTrtRunner(EngineFromPath(str(engine_path)), name=name)


def gpu_info() -> dict | None:
    """``{"name", "compute_capability"}`` of CUDA device 0, or None when no NVIDIA GPU is visible."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    # A CPU-only PyTorch cannot see the GPU that TensorRT would use: ask the driver.
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", "--id=0"]
    result = subprocess.run(query, capture_output=True, text=True, check=False)
    if result.returncode != 0 or "," not in result.stdout:
        return None
    name, capability = (part.strip() for part in result.stdout.strip().splitlines()[0].rsplit(",", 1))
    return {"name": name, "compute_capability": capability}


def check_profile(
    batch_min: int,
    batch_opt: int,
    batch_max: int,
) -> None:
    if not 1 <= batch_min <= batch_opt <= batch_max:
        raise UsageError(f"batch profile {batch_min}/{batch_opt}/{batch_max} must satisfy 1 <= min <= opt <= max")


def default_timing_cache(
    flavour: TrtFlavour,
) -> Path:
    """One cache per TensorRT flavour and version: timing caches do not carry across versions."""
    root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return root / "colln" / f"timing-{flavour.name}-{flavour.version}.cache"


def _timing_cache(
    path: Path | None,
    flavour: TrtFlavour,
) -> Path | None:
    """The timing cache to read and update: ``path`` (it must be writable), else the default one;
    None (a build without a cache: the same engine, found more slowly) when the default cannot be
    written, as in a container with a read-only home."""
    cache = Path(path).expanduser() if path is not None else default_timing_cache(flavour)
    fix = "pass --timing-cache a writable PATH"
    try:
        check_writable_dir(cache.parent, fix)
        if cache.exists() and not os.access(cache, os.W_OK):
            raise path_problem(PermissionError(errno.EACCES, os.strerror(errno.EACCES)), cache, fix)
    except UsageError as exc:
        if path is not None:
            raise
        print(f"colln: warning: {exc}; building without a timing cache", file=sys.stderr)
        return None
    return cache


def build_engine(
    export_dir: Path,
    batch_min: int = 1,
    batch_opt: int = 8,
    batch_max: int = 32,
    timing_cache: Path | None = None,
) -> Path:
    """Build ``export_dir/model.plan`` (+ ``model.plan.json``, ``model.plan.log``) from ``model.onnx``.

    The profile covers batches ``batch_min..batch_max``, tuned for ``batch_opt``. ``timing_cache``
    (default: ``default_timing_cache``, skipped with a warning when it cannot be written) is read
    before and updated after the build. Returns the plan's path. A failed build leaves any previous
    plan untouched and its log in ``model.plan.failed.log``.
    """
    check_profile(batch_min, batch_opt, batch_max)
    export_dir = Path(export_dir)
    from colln.export.artifact import read_export

    spec = read_export(export_dir)  # model.onnx there and carrying export.json's keep plan
    onnx_path = export_dir / ONNX_FILE
    flavour = trt_module()
    gpu = gpu_info()
    if flavour.name == "tensorrt" and gpu is None:
        raise BackendUnavailableError(
            "full TensorRT builds engines only on an NVIDIA GPU and none is visible: build on the target GPU, "
            "or pip install 'colln[trt-rtx]' to build without one"
        )
    # Checked now, not after a build of minutes.
    check_writable_dir(
        export_dir, "colln-build writes model.plan into the export directory: make it writable, or export to a writable --out"
    )
    cache = _timing_cache(timing_cache, flavour)

    from polygraphy.exception import PolygraphyException

    log_tmp = export_dir / f".{ENGINE_LOG_FILE}.tmp-{os.getpid()}"
    start = time.perf_counter()
    try:
        with _polygraphy_log(log_tmp), polygraphy_trt():
            engine_bytes, network_io, input_shape = _build(flavour, gpu, onnx_path, (batch_min, batch_opt, batch_max), cache)
    except PolygraphyException as exc:
        failed_log = export_dir / FAILED_LOG_FILE
        os.replace(log_tmp, failed_log)
        raise EngineError(
            f"{flavour.label} could not build {ONNX_FILE}: {_first_error(failed_log, exc)} (log: {failed_log})"
        ) from exc
    except BaseException:
        log_tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start

    meta = {
        "plan": ENGINE_FILE,
        "tensorrt": {"flavour": flavour.name, "version": flavour.version},
        "gpu": gpu,
        # None: TensorRT-RTX's default portable targets (Ampere and later); full TensorRT plans
        # run only on the GPU model that built them.
        "compute_capabilities": [gpu["compute_capability"]] if gpu else None,
        "precision": spec.precision,
        "strongly_typed": True,
        "io": network_io,
        "profile": {
            "input": INPUT_NAME,
            "min": [batch_min, *input_shape],
            "opt": [batch_opt, *input_shape],
            "max": [batch_max, *input_shape],
        },
        "keep_plan": spec.plan_record,
        "onnx_sha256": file_sha256(onnx_path),
        "timing_cache": str(cache) if cache is not None else None,
        "build_seconds": round(seconds, 2),
    }
    engine = export_dir / ENGINE_FILE
    meta_path = export_dir / ENGINE_META_FILE
    # model.plan.json goes last: an engine without it is incomplete and is refused at load time.
    meta_path.unlink(missing_ok=True)
    atomic_write(engine, bytes(engine_bytes))
    os.replace(log_tmp, export_dir / ENGINE_LOG_FILE)
    atomic_write(meta_path, json.dumps(meta, indent=2) + "\n")
    (export_dir / FAILED_LOG_FILE).unlink(missing_ok=True)
    print(
        f"colln: built {ENGINE_FILE} with {flavour.label} ({spec.precision}, "
        f"batch {batch_min}/{batch_opt}/{batch_max}) in {seconds:.1f} s",
        file=sys.stderr,
    )
    return engine


def _build(
    flavour: TrtFlavour,
    gpu: dict | None,
    onnx_path: Path,
    batches: tuple[int, int, int],
    cache: Path | None,
) -> tuple[memoryview, dict[str, str], list[int]]:
    """Parse and build with polygraphy's loaders: (plan bytes, I/O dtypes, input shape without batch)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in inputs] != [INPUT_NAME]:
        raise EngineError(
            f"{onnx_path} has inputs {[t.name for t in inputs]}, expected [{INPUT_NAME!r}]: re-export it with colln-export"
        )
    input_shape = list(inputs[0].shape)[1:]
    profile = Profile().add(INPUT_NAME, *[(b, *input_shape) for b in batches])
    cache_file = str(cache) if cache is not None else None
    common = {"profiles": [profile], "load_timing_cache": cache_file}
    if flavour.name == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        # With a GPU present, target it; without one, TensorRT-RTX's portable default targets.
        config = CreateConfigRTX(use_gpu=gpu is not None, **common)
    else:
        config = CreateConfig(**common)
    engine_bytes = EngineBytesFromNetwork((builder, network, parser), config=config, save_timing_cache=cache_file)()
    network_io = {t.name: _dtype_name(t.dtype) for t in (*inputs, *outputs)}
    return memoryview(engine_bytes), network_io, input_shape


def _dtype_name(
    dtype: object,
) -> str:
    from polygraphy.datatype import DataType

    converted = DataType.from_dtype(dtype, "tensorrt")
    return converted.name.lower() if converted is not None else str(dtype)


@contextlib.contextmanager
def _polygraphy_log(
    path: Path,
) -> Iterator[None]:
    """Send polygraphy's and TensorRT's log (verbose) to ``path`` instead of the console."""
    from polygraphy.logger import G_LOGGER

    saved = (G_LOGGER.use_python_logging_system, G_LOGGER.module_severity)
    logger = logging.getLogger("Polygraphy")
    saved_logger = (logger.level, logger.propagate)
    handler = logging.FileHandler(path, mode="w")
    logger.addHandler(handler)
    logger.setLevel(1)
    logger.propagate = False
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.module_severity = G_LOGGER.VERBOSE
    try:
        yield
    finally:
        G_LOGGER.use_python_logging_system, G_LOGGER.module_severity = saved
        logger.setLevel(saved_logger[0])
        logger.propagate = saved_logger[1]
        logger.removeHandler(handler)
        handler.close()


def _first_error(
    log: Path,
    exc: Exception,
) -> str:
    """The first error line of a failed build's log (polygraphy prefixes errors with ``[E]``)."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    first = next((line[3:].strip() for line in lines if line.startswith("[E]")), str(exc).strip().splitlines()[0])
    return first[:300]


def read_engine_metadata(
    export_dir: Path,
) -> dict:
    """``model.plan.json`` of an export; a clear error when the plan is missing or incomplete."""
    export_dir = Path(export_dir)
    meta_path = export_dir / ENGINE_META_FILE
    if not (export_dir / ENGINE_FILE).is_file() or not meta_path.is_file():
        raise ExportDirError(
            f"{export_dir} has no complete TensorRT plan ({ENGINE_FILE} + {ENGINE_META_FILE}): run colln-build {export_dir}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        complete = {"flavour", "version"} <= set(meta["tensorrt"]) and {"precision", "profile"} <= set(meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportDirError(f"{meta_path} is unreadable ({exc}): rebuild with colln-build {export_dir}") from exc
    if not complete:
        raise ExportDirError(
            f"{meta_path} lacks the TensorRT version, precision or profile: rebuild with colln-build {export_dir}"
        )
    return meta

"""One runner protocol over PyTorch, ONNX Runtime and TensorRT: polygraphy's ``BaseRunner``
(``activate / infer / deactivate``, ``get_input_metadata``; usable as a context manager and by
polygraphy's ``Comparator``). Feeds and outputs are ``{name: numpy array}``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from torch import nn

from colln.errors import BackendUnavailableError, UsageError
from colln.export.spec import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, ExportSpec

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class TorchRunner(BaseRunner):
    """Runs a PyTorch module (the pruned reference) on CPU or CUDA; fp32 in, fp32 out."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, int, int],
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, prefix="torch-runner")
        self._model = model
        self._input_shape = input_shape
        self.device = device

    def activate_impl(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("torch runner: CUDA is not available; use device='cpu'")
        self.model = self._model.to(self.device).eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return TensorMetadata().add(INPUT_NAME, dtype=np.float32, shape=(-1, *self._input_shape))

    def infer_impl(
        self,
        feed_dict: dict[str, np.ndarray],
    ) -> OrderedDict:
        x = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT_NAME], dtype=np.float32)).to(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            y = self.model(x)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT_NAME, y.float().cpu().numpy())])

    def deactivate_impl(self) -> None:
        del self.model


def onnxruntime_runner(
    onnx_path: Path | bytes,
    device: str = "cpu",
    threads: int | None = None,
):
    """polygraphy's ``OnnxrtRunner`` over an ONNX Runtime session (CUDA when onnxruntime-gpu is installed).
    ``onnx_path`` may also be a serialized model (validation runs an in-memory copy)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'colln[cpu]' (or 'colln[gpu]')") from exc
    from polygraphy.backend.onnxrt import OnnxrtRunner

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError("onnxruntime has no CUDA provider: pip install 'colln[gpu]' (replaces onnxruntime)")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads

    def session():
        model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
        return ort.InferenceSession(model, sess_options=options, providers=providers)

    return OnnxrtRunner(session, name=f"onnxruntime-{device}")


def load(
    export_dir: Path,
    backend: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
) -> BaseRunner:
    """A runner for an export directory: ``torch`` (the pruned PyTorch reference rebuilt from
    ``export.json``), ``onnxruntime`` (``model.onnx``) or ``tensorrt`` (``model.plan``)."""
    export_dir = Path(export_dir)
    spec = ExportSpec.read(export_dir)
    if backend == "torch":
        model = spec.load_pruned()
        return TorchRunner(model, _input_shape(model), device=device)
    if backend == "onnxruntime":
        return onnxruntime_runner(export_dir / ONNX_FILE, device=device, threads=threads)
    if backend == "tensorrt":
        from colln.export.tensorrt import tensorrt_runner

        return tensorrt_runner(export_dir)
    raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _input_shape(
    model: nn.Module,
) -> tuple[int, int, int]:
    from colln.data import data_config

    return tuple(data_config(model)["input_size"])


def run(
    runner: BaseRunner,
    images: np.ndarray,
    batch: int = 32,
) -> np.ndarray:
    """Logits for ``images`` ``[N, 3, H, W]`` in batches of at most ``batch`` (runner must be active)."""
    outs = [runner.infer({INPUT_NAME: np.ascontiguousarray(images[i : i + batch])})[OUTPUT_NAME].copy() for i in range(0, len(images), batch)]
    return np.concatenate(outs)

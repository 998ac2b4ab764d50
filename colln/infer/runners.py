"""One runner protocol over PyTorch, ONNX Runtime and TensorRT: polygraphy's ``BaseRunner``
(``activate / infer / deactivate``, ``get_input_metadata``; usable as a context manager and by
polygraphy's ``Comparator``). Feeds and outputs are ``{name: numpy array}``.

:func:`open_runner` is the one way every command gets a runner: validation, timing, evaluation
and serving. It opens the artifact the export lists for the backend
(:func:`colln.export.manifest.deployed`) through :func:`open_artifact`, by the artifact's runtime.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType
from torch import nn

from colln.errors import BackendUnavailableError, EngineError, UsageError
from colln.export.artifact import ORT_SESSION_OPTIONS, read_export
from colln.export.manifest import Artifact, deployed
from colln.export.spec import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, output_names
from colln.export.tensorrt import LABELS, TrtFlavour, engine_runner, gpu_info, trt_module

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")


class TorchRunner(BaseRunner):
    """Runs a PyTorch module (the pruned reference) on CPU or CUDA; fp32 in, fp32 out. ``threads``
    (None: torch's own) holds only during the runner's own inference calls."""

    def __init__(
        self,
        model: nn.Module,
        device: str = "cpu",
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        from colln.data import data_config

        super().__init__(name=name, prefix="torch-runner")
        self._model = model
        self._input_shape = tuple(data_config(model)["input_size"])
        self.device = device
        self.threads = threads

    def activate_impl(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("torch runner: CUDA is not available; use device='cpu'")
        self.model = self._model.to(self.device).eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return TensorMetadata().add(INPUT_NAME, dtype=DataType.FLOAT32, shape=(-1, *self._input_shape))

    def infer_impl(
        self,
        feed_dict: dict[str, np.ndarray],
    ) -> OrderedDict:
        x = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT_NAME], dtype=np.float32)).to(self.device)
        with _torch_threads(self.threads):
            start = time.perf_counter()
            with torch.inference_mode():
                y = self.model(x)
                if self.device.startswith("cuda"):
                    torch.cuda.synchronize()
            self.inference_time = time.perf_counter() - start
        plan = getattr(self.model, "colln_plan", None)
        names = output_names(plan.config, plan) if plan is not None else (OUTPUT_NAME,)
        ys = y if isinstance(y, tuple) else (y,)
        return OrderedDict(
            (name, t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()) for name, t in zip(names, ys)
        )

    def deactivate_impl(self) -> None:
        del self.model


@contextlib.contextmanager
def _torch_threads(
    threads: int | None,
) -> Iterator[None]:
    """torch's intra-op thread count for one call, restored after it (None: leave it alone)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(saved)


def onnxruntime_runner(
    model: Path | onnx.ModelProto,
    device: str = "cpu",
    threads: int | None = None,
    split_batches: bool = True,
    fused: bool = False,
) -> BaseRunner:
    """polygraphy's ``OnnxrtRunner`` over an ONNX Runtime session (CUDA when onnxruntime-gpu is installed).
    ``model`` is a path or an in-memory graph (validation runs a copy with extra outputs). On CPU
    the session runs the graph's ONNX Runtime flavour (:func:`colln.export.ort_graph.for_onnxruntime`),
    and with ``split_batches`` a batch of at least as many images as threads runs as one slice per
    thread (:class:`SplitBatchOnnxrtRunner`). ``fused``: ``model`` is already that flavour (an
    export's ``model.ort.onnx``) and is loaded as it is."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'colln[cpu]' (or 'colln[gpu]')") from exc

    cuda = device.startswith("cuda")
    providers = ["CPUExecutionProvider"]
    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError("onnxruntime has no CUDA provider: pip install 'colln[gpu]' (replaces onnxruntime)")
        providers.insert(0, "CUDAExecutionProvider")

    def session(intra_threads: int | None = threads) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if intra_threads:
            options.intra_op_num_threads = intra_threads
        # Intra-op workers stop spinning when a run returns (they still spin within it): otherwise a
        # session's idle pool keeps a core busy while the next session runs. Interleaved timing and
        # serving several models alternate sessions; deit_small, batch 1, 2 threads, alternating
        # unpruned/pruned: 98/76 ms (ratio 1.28) with spinning, 52/36 ms (1.48) with this
        # (docs/benchmarks.md#batch-1-at-the-default-thread-count). allow_spinning=0 also helps but made
        # digits_vit 7x slower.
        for key, value in ORT_SESSION_OPTIONS.items():
            options.add_session_config_entry(key, value)
        # Errors only: ONNX Runtime warns about every constant its GELU fusion leaves unused.
        options.log_severity_level = 3
        loaded = str(model) if fused else session_model(model, fuse=not cuda)
        return ort.InferenceSession(loaded, sess_options=options, providers=providers)

    workers = threads or len(os.sched_getaffinity(0))
    if split_batches and not cuda and workers > 1:
        return SplitBatchOnnxrtRunner(session, lambda: session(1), workers, name=f"onnxruntime-{device}")
    return OnnxrtRunner(session, name=f"onnxruntime-{device}")


class SplitBatchOnnxrtRunner(OnnxrtRunner):
    """polygraphy's ``OnnxrtRunner`` that runs a batch of at least ``workers`` images as ``workers``
    slices at once, each on one thread of a second, single-thread session of the same graph
    (made on the first such batch); smaller batches run on the first session's threads.

    Why: ONNX Runtime splits each op across its threads, so every op's output crosses between
    cores. A cloud VM's vCPUs can sit on different dies of the host, for seconds to minutes at a
    time; then each crossing costs about 350 ns instead of 130 (a cache-line round trip, see
    docs/benchmarks.md#the-vms-two-speeds-two-vcpu-placements), and an int8 graph, with little
    arithmetic per byte, ran no faster on 2 threads than on 1. Slices share nothing while they run: deit_small, batch 8, 2 vCPUs,
    pruned int8 102-134 ms in either placement, against 105-137 ms split by op (docs/benchmarks.md).
    Each image is computed alone either way, so the outputs are the same. The cost is a second copy
    of the session's prepacked weights."""

    def __init__(
        self,
        session: Callable[[], object],
        single_thread_session: Callable[[], object],
        workers: int,
        name: str | None = None,
    ) -> None:
        super().__init__(session, name=name)
        self._single_thread_session = single_thread_session
        self.workers = workers

    def activate_impl(self) -> None:
        self.sess = self._sess()
        self._single = None
        self._pool = None
        # Splittable when every input and output is batch-major (the same symbolic first dim).
        tensors = [*self.sess.get_inputs(), *self.sess.get_outputs()]
        batch = tensors[0].shape[0] if tensors[0].shape else None
        self._splittable = isinstance(batch, str) and all(t.shape and t.shape[0] == batch for t in tensors)

    def infer_impl(
        self,
        feed_dict: dict[str, np.ndarray],
    ) -> OrderedDict:
        start = time.perf_counter()
        batch = len(next(iter(feed_dict.values())))
        if batch < self.workers or not self._splittable:
            outputs = self.sess.run(None, feed_dict)
        else:
            if self._single is None:
                self._single = self._single_thread_session()
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="colln-slice")
            bounds = np.linspace(0, batch, self.workers + 1).astype(int)
            slices = [{name: x[a:b] for name, x in feed_dict.items()} for a, b in itertools.pairwise(bounds)]
            parts = list(self._pool.map(lambda feed: self._single.run(None, feed), slices))
            outputs = [np.concatenate(pieces) for pieces in zip(*parts, strict=True)]
        self.inference_time = time.perf_counter() - start
        return OrderedDict((node.name, out) for node, out in zip(self.sess.get_outputs(), outputs, strict=True))

    def deactivate_impl(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        del self.sess, self._single, self._pool


def session_model(
    model: Path | onnx.ModelProto,
    fuse: bool,
) -> str | bytes:
    """What an ONNX Runtime session loads for ``model``: the serialized graph, with colln's ONNX
    Runtime fusions when ``fuse``; the path itself for a graph over protobuf's 2 GB (unfused)."""
    from colln.export.onnx import MAX_SINGLE_FILE
    from colln.export.ort_graph import for_onnxruntime

    if not isinstance(model, onnx.ModelProto):
        model = Path(model)
        if model.stat().st_size > MAX_SINGLE_FILE:
            return str(model)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    if fuse:
        proto, _ = for_onnxruntime(proto)
    if proto.ByteSize() > MAX_SINGLE_FILE:
        if isinstance(model, Path):
            return str(model)
        raise UsageError("an in-memory graph over 2 GB cannot be given to ONNX Runtime: save it with external data")
    return proto.SerializeToString()


def kept_onnxruntime_runner(
    onnx_path: Path,
    pruned_layers: tuple[tuple[int, int], ...],
    device: str = "cpu",
    threads: int | None = None,
    split_batches: bool = True,
) -> BaseRunner:
    """ONNX Runtime on an in-memory copy of the graph that also outputs the kept indices of every
    pruning layer (see :func:`colln.export.onnx.with_kept_outputs`)."""
    from colln.export.onnx import MAX_SINGLE_FILE, with_kept_outputs

    proto = with_kept_outputs(onnx.load(str(onnx_path)), pruned_layers)
    if proto.ByteSize() > MAX_SINGLE_FILE:
        # Over protobuf's 2 GB: cannot be serialized in memory; validation falls back to the margin rule.
        return onnxruntime_runner(onnx_path, device=device, threads=threads, split_batches=split_batches)
    return onnxruntime_runner(proto, device=device, threads=threads, split_batches=split_batches)


class OpenvinoRunner(BaseRunner):
    """Runs an export's OpenVINO IR on the CPU (:mod:`colln.export.openvino`): the verified
    ``artifact`` (:func:`colln.export.manifest.deployed`), compiled at its precision (an fp32 IR
    runs at fp32 or bf16, an int8 IR at int8 or int8-bf16: OpenVINO's f32 or bf16 hint) on
    ``threads`` inference threads (None: OpenVINO's default). ``kept``: TopK index tensors to add
    as outputs, named like ONNX Runtime's kept outputs (``colln_kept_L<layer>_<j>``), so that
    validation compares the tokens OpenVINO really kept. Once active, ``runtime_precisions`` holds
    how many matrix products run at each precision in the compiled model's execution graph
    (:func:`colln.export.openvino.runtime_precisions`)."""

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        kept: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, prefix="openvino-runner")
        self.precision = artifact.precision
        self.name = name or f"openvino-{self.precision}"
        self._xml = artifact.path
        self.threads = threads
        self._kept = kept or {}

    def activate_impl(self) -> None:
        from colln.export.openvino import compile_model, ov_module, runtime_precisions

        model = ov_module().Core().read_model(str(self._xml))
        added = model.add_outputs(list(self._kept)) if self._kept else []
        self.compiled = compile_model(model, self.precision, self.threads)
        self.runtime_precisions = runtime_precisions(self.compiled, model)
        names = [o.get_any_name() for o in model.outputs[: len(model.outputs) - len(added)]]
        self._names = names + [self._kept[o.get_any_name()] for o in added]
        self._request = self.compiled.create_infer_request()

    @property
    def inference_precision(self) -> str:
        """What OpenVINO really runs (read back from the compiled model)."""
        from colln.export.openvino import used_precision

        return used_precision(self.compiled)

    def get_input_metadata_impl(self) -> TensorMetadata:
        shape = [d.get_length() if d.is_static else -1 for d in self.compiled.inputs[0].get_partial_shape()]
        return TensorMetadata().add(INPUT_NAME, dtype=DataType.FLOAT32, shape=shape)

    def infer_impl(
        self,
        feed_dict: dict[str, np.ndarray],
    ) -> OrderedDict:
        x = np.ascontiguousarray(feed_dict[INPUT_NAME], dtype=np.float32)
        start = time.perf_counter()
        results = self._request.infer({0: x})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, np.asarray(results[i])) for i, name in enumerate(self._names))

    def deactivate_impl(self) -> None:
        del self._request, self.compiled


def openvino_runner(
    export_dir: Path,
    precision: str | None = None,
    threads: int | None = None,
    record_kept: bool = False,
) -> OpenvinoRunner:
    """An :class:`OpenvinoRunner` over ``export_dir``'s IR at ``precision`` (None: its recorded
    one); with ``record_kept`` it also outputs the kept indices of every pruning layer."""
    return open_artifact(deployed(export_dir, "openvino", precision=precision), threads=threads, record_kept=record_kept)


def _open_openvino(
    artifact: Artifact,
    device: str,
    threads: int | None,
    split_batches: bool,
    record_kept: bool,
) -> OpenvinoRunner:
    """With ``record_kept``, the TopK index tensors of :func:`colln.export.onnx.kept_index_nodes`
    (which keep their ONNX names in the IR) as extra outputs."""
    from colln.export.onnx import KEPT_OUTPUT_PREFIX, kept_index_nodes

    if device != "cpu":
        raise UsageError(f"colln runs OpenVINO on the CPU only, not {device!r}: use --device cpu")
    kept = None
    if record_kept:
        layers = read_export(artifact.directory).keep_plan().kept_index_layers
        proto = onnx.load(str(Path(artifact.directory) / ONNX_FILE), load_external_data=False)
        kept = {
            tensor: f"{KEPT_OUTPUT_PREFIX}{layer}_{j}"
            for layer, tensors in kept_index_nodes(proto, layers).items()
            for j, tensor in enumerate(tensors)
        }
    return OpenvinoRunner(artifact, threads=threads, kept=kept)


def check_engine(
    meta: dict,
    flavour: TrtFlavour,
    gpu: dict | None,
) -> None:
    """Refuse a plan that this TensorRT or GPU cannot run (plans are tied to both)."""
    built = meta["tensorrt"]
    built_label = f"{LABELS.get(built['flavour'], built['flavour'])} {built['version']}"
    rebuild = "rebuild it here with colln-build EXPORT_DIR"
    if (built["flavour"], built["version"]) != (flavour.name, flavour.version):
        raise EngineError(f"model.plan was built with {built_label} but this machine runs {flavour.label}: {rebuild}")
    if gpu is None:
        raise BackendUnavailableError(
            "no NVIDIA GPU is visible: TensorRT plans run only on a GPU; use backend='onnxruntime' on this machine"
        )
    targets = meta.get("compute_capabilities")
    if targets and gpu["compute_capability"] not in targets:
        raise EngineError(
            f"model.plan targets compute capability {', '.join(targets)} but this GPU ({gpu['name']}) is "
            f"{gpu['compute_capability']}: {rebuild}"
        )
    built_gpu = (meta.get("gpu") or {}).get("name")
    if flavour.name == "tensorrt" and built_gpu != gpu["name"]:
        raise EngineError(f"model.plan was built for {built_gpu or 'an unknown GPU'} but this GPU is {gpu['name']}: {rebuild}")


def tensorrt_runner(
    export_dir: Path,
) -> BaseRunner:
    """polygraphy's ``TrtRunner`` over ``export_dir/model.plan``, after :func:`check_engine`."""
    return open_artifact(deployed(export_dir, "tensorrt"))


def _open_tensorrt(
    artifact: Artifact,
    device: str,
    threads: int | None,
    split_batches: bool,
    record_kept: bool,
) -> BaseRunner:
    flavour = trt_module()
    check_engine(artifact.extra, flavour, gpu_info())
    return engine_runner(artifact.path, f"tensorrt-{artifact.precision}", flavour)


def _open_onnxruntime(
    artifact: Artifact,
    device: str,
    threads: int | None,
    split_batches: bool,
    record_kept: bool,
) -> BaseRunner:
    """ONNX Runtime on ``model.onnx`` (fused at load on the CPU), or on the listed fused
    ``model.ort.onnx`` as it is; with ``record_kept``, on a copy of ``model.onnx`` that also
    outputs the kept indices (:func:`kept_onnxruntime_runner`)."""
    if record_kept:
        layers = read_export(artifact.directory).keep_plan().kept_index_layers
        onnx_path = Path(artifact.directory) / ONNX_FILE
        return kept_onnxruntime_runner(onnx_path, layers, device, threads, split_batches)
    fused = artifact.runtime == "onnxruntime"
    return onnxruntime_runner(artifact.path, device=device, threads=threads, split_batches=split_batches, fused=fused)


# Which runner opens an artifact, by the artifact's runtime ("onnx": the plain graph, on ONNX Runtime).
OPENERS = {
    "onnx": _open_onnxruntime,
    "onnxruntime": _open_onnxruntime,
    "openvino": _open_openvino,
    "tensorrt": _open_tensorrt,
}


def open_artifact(
    artifact: Artifact,
    device: str = "cpu",
    threads: int | None = None,
    split_batches: bool = True,
    record_kept: bool = False,
) -> BaseRunner:
    """The runner of a verified ``artifact`` (:func:`colln.export.manifest.deployed`), by its
    runtime (:data:`OPENERS`); see :func:`open_runner` for the options."""
    return OPENERS[artifact.runtime](artifact, device, threads, split_batches, record_kept)


def open_runner(
    source: Path | nn.Module,
    backend: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
    record_kept: bool = False,
    split_batches: bool = True,
    precision: str | None = None,
) -> BaseRunner:
    """A runner for an export directory, or for an in-memory PyTorch model (backend ``torch`` only).

    ``torch``: the pruned PyTorch reference rebuilt from ``export.json``; otherwise the artifact
    ``backend`` runs on ``device`` (:func:`colln.export.manifest.deployed`): ``onnxruntime``:
    ``model.ort.onnx`` on the CPU when listed, else ``model.onnx``; ``openvino``:
    ``openvino/model.xml`` (CPU only) at ``precision`` (None: its recorded one); ``tensorrt``:
    ``model.plan``. ``threads`` (None: the backend's default) reaches torch, ONNX Runtime and
    OpenVINO through the runner. ``record_kept``: ONNX Runtime and OpenVINO also output the tokens
    each pruning layer kept (for validation). ``split_batches``: ONNX Runtime on CPU runs a batch of
    at least as many images as threads as one slice per thread (:class:`SplitBatchOnnxrtRunner`)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if isinstance(source, nn.Module):
        if backend != "torch":
            raise UsageError(f"an in-memory model runs on the torch backend only, not {backend!r}: export it first")
        return TorchRunner(source, device=device, threads=threads)
    export_dir = Path(source)
    spec = read_export(export_dir)
    if backend == "torch":
        return TorchRunner(spec.load_pruned(), device=device, threads=threads)
    artifact = deployed(export_dir, backend, spec, device, precision)
    return open_artifact(artifact, device, threads, split_batches, record_kept)


def feeds(
    images: np.ndarray,
    batch: int = 32,
) -> Iterator[dict[str, np.ndarray]]:
    """``images`` ``[N, 3, H, W]`` as feeds of at most ``batch`` images."""
    if batch < 1:
        raise UsageError(f"batch size must be >= 1, got {batch}")
    for i in range(0, len(images), batch):
        yield {INPUT_NAME: np.ascontiguousarray(images[i : i + batch], dtype=np.float32)}


def run(
    runner: BaseRunner,
    images: np.ndarray,
    batch: int = 32,
) -> np.ndarray:
    """Logits for ``images`` ``[N, 3, H, W]`` in batches of at most ``batch`` (runner must be active)."""
    return np.concatenate([runner.infer(feed)[OUTPUT_NAME].copy() for feed in feeds(images, batch)])

"""An export's artifacts, typed: each entry of ``export.json``'s ``artifacts`` (and the TensorRT
plan's ``model.plan.json``) is an :class:`Artifact`: the runtime that runs it, its file, the
precision it runs at (:mod:`colln.export.precisions`), its options and its files' sha256.

:func:`deployed` is the one place that says which artifact a runtime runs from an export on a
device, checked against the files and the graph (:meth:`Artifact.verify`); runners
(:func:`colln.infer.runners.open_artifact`), validation, the variant stack, the Triton writer
and the report all read it. An artifact that no longer matches its record is refused
(ExportDirError), never run under another export's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from colln.errors import EngineError, ExportDirError, UsageError
from colln.export.precisions import VOCABULARY, graph_precisions, runs_on
from colln.export.spec import ONNX_FILE, SPEC_FILE, ExportSpec, file_sha256, listed_file

# What to run again when an artifact does not match its record.
_REDO = {
    "onnx": "re-run colln-export with --force",
    "onnxruntime": "re-run colln-export with --force",
    "openvino": "re-run colln-export with --openvino --force",
}
# How an error names an artifact of a runtime: "an OpenVINO int8 IR".
_NAMES = {
    "onnx": ("ONNX", "graph"),
    "onnxruntime": ("ONNX Runtime", "graph"),
    "openvino": ("OpenVINO", "IR"),
    "tensorrt": ("TensorRT", "plan"),
}
# The runtimes whose records name the precision they run at: OpenVINO compiles at a hint; the
# others run the graph's own precision, the export's.
_CHOOSES_PRECISION = frozenset({"openvino"})


@dataclass(frozen=True)
class Artifact:
    """One file (with its companions) of an export in ``directory`` that ``runtime`` runs at
    ``precision``: ``options`` it is run with, ``sha256`` of every file it consists of,
    ``source_sha256`` of the ``model.onnx`` it was derived from (``None``: not derived, or not
    recorded), and ``extra``: the rest of its record as written (OpenVINO's inference precision and
    accuracy control, a TensorRT plan's whole ``model.plan.json``)."""

    directory: Path
    runtime: str
    file: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    source_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.file

    @property
    def graph(self) -> str:
        """The export precision of the graph it runs (an fp32 IR at the bf16 hint: ``fp32``)."""
        return VOCABULARY[self.precision].graph

    @property
    def tolerance(self) -> str:
        """The validation tolerance row it is judged by (:data:`colln.verify.validate.TOLERANCES`)."""
        return VOCABULARY[self.precision].tolerance

    @classmethod
    def from_record(
        cls,
        directory: Path,
        runtime: str,
        record: object,
        graph: str,
    ) -> Artifact:
        """The artifact an ``export.json`` entry ``artifacts[runtime]`` records, for an export of
        ``graph`` precision; ExportDirError when it is no record of a file, names a precision colln
        does not run on ``runtime``, or one that runs another graph."""
        where = f"{Path(directory) / SPEC_FILE}: artifacts.{runtime}"
        redo = _REDO.get(runtime, "re-run colln-export with --force")
        if not isinstance(record, dict) or "file" not in record:
            raise ExportDirError(f"{where} is not a record: {redo}")
        record = dict(record)
        file = record.pop("file")
        precision = record.pop("precision", graph) if runtime in _CHOOSES_PRECISION else graph
        if precision not in runs_on(runtime):
            raise ExportDirError(f"{where}.precision is {precision!r}, not one of {', '.join(runs_on(runtime))}: {redo}")
        if VOCABULARY[precision].graph != graph:
            ran, noun = VOCABULARY[precision].graph, _NAMES[runtime][1]
            raise ExportDirError(f"{where}.precision {precision} runs an {ran} {noun}, but this is a {graph} export: {redo}")
        sha = record.pop("sha256", None)
        return cls(
            directory=Path(directory),
            runtime=runtime,
            file=file,
            precision=precision,
            options=record.pop("options", {}),
            # One file's digest, or a digest per file of an artifact of several (an IR and its weights).
            sha256={file: sha} if isinstance(sha, str) else sha if isinstance(sha, dict) else {},
            source_sha256=record.pop("source_sha256", None),
            extra=record,
        )

    def to_record(self) -> dict:
        """The ``export.json`` entry: :meth:`from_record` of it gives this artifact back."""
        record: dict[str, Any] = {"file": self.file}
        if self.runtime in _CHOOSES_PRECISION:
            record["precision"] = self.precision
        if self.sha256:
            single = list(self.sha256) == [self.file]
            record["sha256"] = self.sha256[self.file] if single else dict(self.sha256)
        if self.source_sha256 is not None:
            record["source_sha256"] = self.source_sha256
        if self.options or self.runtime != "onnx":
            record["options"] = dict(self.options)
        return {**record, **self.extra}

    def at(
        self,
        precision: str | None,
    ) -> Artifact:
        """The same files run at ``precision`` (``None``: as recorded): OpenVINO runs an fp32 IR at
        fp32 or bf16, an int8 IR at int8 or int8-bf16; a UsageError for any other."""
        if precision is None or precision == self.precision:
            return self
        allowed = graph_precisions(self.runtime, self.graph)
        if precision not in allowed:
            vendor, noun = _NAMES[self.runtime]
            raise UsageError(f"an {vendor} {self.graph} {noun} cannot run at {precision}: run it at {' or '.join(allowed)}")
        options = dict(self.options)
        if self.runtime == "openvino":
            options["INFERENCE_PRECISION_HINT"] = VOCABULARY[precision].openvino_hint
        return replace(self, precision=precision, options=options)

    def verify(self) -> Artifact:
        """This artifact after checking its record against its files and graph (ExportDirError
        naming what to re-run otherwise; a TensorRT plan of another ``model.onnx``: EngineError)."""
        _VERIFY[self.runtime](self)
        return self

    def deploy_files(self) -> dict[str, Path]:
        """``{name a serving runtime loads: file of the export}`` (Triton's ``1/`` directory):
        ONNX Runtime's artifact as ``model.onnx``, an IR's ``model.xml`` and ``model.bin``."""
        if self.runtime == "openvino":
            return {Path(name).name: Path(self.directory) / name for name in self.sha256}
        return {_DEPLOYED_NAMES.get(self.runtime, Path(self.file).name): self.path}


# ONNX Runtime's fused graph is deployed under the plain graph's name (Triton loads 1/model.onnx).
_DEPLOYED_NAMES = {"onnx": ONNX_FILE, "onnxruntime": ONNX_FILE}


def _verify_onnx(
    artifact: Artifact,
) -> None:
    if not artifact.path.is_file():
        raise ExportDirError(f"{artifact.directory} has no {artifact.file}: re-run colln-export with --force")


def _verify_onnxruntime(
    artifact: Artifact,
) -> None:
    path = listed_file(artifact.directory, artifact.file, "artifacts.onnxruntime.file")
    if not path.is_file() or file_sha256(path) != artifact.sha256.get(artifact.file):
        raise ExportDirError(f"{path} is missing or does not match export.json: re-run colln-export with --force")
    # The fused file is derived from model.onnx: a model.onnx changed since would not be what runs.
    if file_sha256(Path(artifact.directory) / ONNX_FILE) != artifact.source_sha256:
        raise ExportDirError(
            f"{Path(artifact.directory) / ONNX_FILE} changed since {artifact.file} was made from it: "
            "re-run colln-export with --force"
        )


def _verify_openvino(
    artifact: Artifact,
) -> None:
    """Every hashed file lies inside the export and matches its sha256, the IR and its weights
    both hashed; the IR is quantized (NNCF's FakeQuantize) exactly when it runs an int8 graph, and
    its options hold its precision's hint."""
    from colln.export.openvino import is_quantized

    directory, redo = Path(artifact.directory), _REDO["openvino"]
    where = directory / SPEC_FILE
    xml = listed_file(directory, artifact.file, "artifacts.openvino.file")
    for name in (artifact.file, str(Path(artifact.file).with_suffix(".bin"))):
        if name not in artifact.sha256:
            raise ExportDirError(f"{where}: artifacts.openvino.sha256 has no hash of {name}: {redo}")
    for name, digest in artifact.sha256.items():
        path = listed_file(directory, name, "a file in artifacts.openvino.sha256")
        if not path.is_file():
            raise ExportDirError(f"{path} is missing: {redo}")
        if file_sha256(path) != digest:
            raise ExportDirError(f"{path} does not match export.json (edited or replaced since the export): {redo}")
    quantized = is_quantized(xml)
    if quantized != (artifact.graph == "int8"):
        raise ExportDirError(
            f"{xml} is {'an int8' if quantized else 'an fp32'} IR but export.json records precision {artifact.precision}: {redo}"
        )
    hint = VOCABULARY[artifact.precision].openvino_hint
    if artifact.options != {"INFERENCE_PRECISION_HINT": hint}:
        raise ExportDirError(
            f"{where}: artifacts.openvino.options are not precision {artifact.precision}'s "
            f"{{'INFERENCE_PRECISION_HINT': {hint!r}}}: {redo}"
        )


def _verify_tensorrt(
    artifact: Artifact,
) -> None:
    onnx_path = Path(artifact.directory) / ONNX_FILE
    if onnx_path.is_file() and artifact.source_sha256 != file_sha256(onnx_path):
        raise EngineError(
            f"{artifact.file} was built from another {ONNX_FILE} than the one in {artifact.directory}: "
            f"run colln-build {artifact.directory}"
        )


_VERIFY = {
    "onnx": _verify_onnx,
    "onnxruntime": _verify_onnxruntime,
    "openvino": _verify_openvino,
    "tensorrt": _verify_tensorrt,
}


def engine_artifact(
    directory: Path,
    graph: str | None = None,
) -> Artifact:
    """The TensorRT plan of an export as an artifact, from its ``model.plan.json``
    (:func:`colln.export.tensorrt.read_engine_metadata`): the plan's precision, the sha256 of the
    ``model.onnx`` it was built from, the whole metadata as ``extra``. ``graph``: the export's
    precision, which the plan's must be (None: not checked)."""
    from colln.export.tensorrt import ENGINE_FILE, ENGINE_META_FILE, read_engine_metadata

    meta = read_engine_metadata(directory)
    precision = meta["precision"]
    if precision not in runs_on("tensorrt") or (graph is not None and precision != graph):
        raise ExportDirError(
            f"{Path(directory) / ENGINE_META_FILE} records precision {precision!r}, not this {graph} export's: "
            f"rebuild with colln-build {directory}"
        )
    return Artifact(
        directory=Path(directory),
        runtime="tensorrt",
        file=ENGINE_FILE,
        precision=precision,
        source_sha256=meta.get("onnx_sha256"),
        extra=meta,
    )


def listed(
    directory: Path,
    spec: ExportSpec,
    runtime: str,
) -> Artifact | None:
    """The artifact ``export.json`` lists for ``runtime`` (unchecked), or None when it lists none;
    an export that lists no ``onnx`` entry (older ones) still has its ``model.onnx``."""
    record = spec.artifacts.get(runtime)
    if record is None and runtime == "onnx":
        record = {"file": ONNX_FILE}
    return None if record is None else Artifact.from_record(directory, runtime, record, spec.precision)


def deployed(
    directory: Path,
    runtime: str,
    spec: ExportSpec | None = None,
    device: str = "cpu",
    precision: str | None = None,
) -> Artifact:
    """What ``runtime`` runs from the export in ``directory`` on ``device``, verified
    (:meth:`Artifact.verify`), at ``precision`` (None: as recorded; :meth:`Artifact.at`).

    ONNX Runtime on the CPU runs the listed ``model.ort.onnx`` (its fused flavour), anywhere else,
    or when none is listed (graphs over 2 GB), ``model.onnx``; OpenVINO its IR; TensorRT
    ``model.plan``. ``spec``: the export's (None: read from ``directory``)."""
    directory = Path(directory)
    if runtime == "tensorrt":
        graph = spec.precision if spec is not None else None
        return engine_artifact(directory, graph).verify().at(precision)
    spec = spec if spec is not None else ExportSpec.read(directory)
    found = None
    if runtime == "onnxruntime" and not device.startswith("cuda"):
        found = listed(directory, spec, "onnxruntime")
    elif runtime == "openvino":
        found = listed(directory, spec, "openvino")
        if found is None:
            raise ExportDirError(f"{directory} has no OpenVINO IR: re-run colln-export with --openvino")
    if found is None:
        found = listed(directory, spec, "onnx")
    return found.verify().at(precision)

"""What an export directory holds and how to rebuild its PyTorch reference.

Layout of an export directory (``exports/<model>-<metric>-keep<R>`` by default)::

    model.onnx     the graph: input ``images`` [batch, 3, H, W] float32, output ``logits``, or for
                   ``output="tokens"`` ``tokens`` [batch, K, C] float32 and ``indices`` [batch, K] int64,
                   for ``output="dense"`` ``features`` [batch, patches, C] float32
    model.ort.onnx model.onnx with ONNX Runtime's attention fusion applied (what ONNX Runtime on CPU runs)
    export.json    ExportSpec (how to rebuild the model) + the keep plan + file names + ``artifacts``,
                   the file each runtime runs, with its sha256 and the options it needs
    report.json    validation and latency report (colln-export), report.md its summary
    model.plan     TensorRT engine (optional, colln-build / --trt) with model.plan.json beside it
    openvino/      OpenVINO IR, model.xml + model.bin (optional, colln-export --openvino)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from colln.errors import CollnError, ExportDirError, WeightsError
from colln.files import atomic_write
from colln.models.config import PruneConfig
from colln.models.plan import KeepPlan

SPEC_FILE = "export.json"
# export.json's key of the keep plan (ExportSpec.plan_record).
PLAN_KEY = "plan"
ONNX_FILE = "model.onnx"
# model.onnx with the fusions colln's ONNX Runtime runner applies (colln.export.ort_graph): what
# ONNX Runtime on CPU runs and is timed on, loadable by a plain default session.
ORT_FILE = "model.ort.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TOKENS_NAME = "tokens"
INDICES_NAME = "indices"
# A VLM tower's tokens output also gives each token's (row, col) on its token grid.
POSITIONS_NAME = "positions"
FEATURES_NAME = "features"
DEFAULT_OPSET = 18
# --weights values that name weights rather than a file.
NAMED_WEIGHTS = ("pretrained", "random", "bundled")


def file_sha256(
    path: Path,
) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def listed_file(
    directory: Path,
    name: object,
    field_name: str,
) -> Path:
    """The file an ``export.json`` field (``field_name``, e.g. ``artifacts.openvino.file``) names,
    refused unless it is a relative path inside the export ``directory``: a manifest edited to point
    at another export's file would otherwise be run, timed or served as this one."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ExportDirError(
            f"{directory / SPEC_FILE}: {field_name} is {name!r}, not a file inside the export: re-run colln-export with --force"
        )
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ExportDirError(
            f"{directory / SPEC_FILE}: {field_name} {name!r} points outside {directory}: re-run colln-export with --force"
        )
    return path


@dataclass(frozen=True)
class ExportSpec:
    """Everything needed to rebuild the pruned PyTorch model of an export: the model, its weights
    and input size (``None`` = the model's default), the :class:`PruneConfig`, precision and opset.
    ``plan_record`` is the resolved keep plan as export.json records it under ``plan``
    (``KeepPlan.to_dict()``), filled in by the exporter; :meth:`keep_plan` reads it back."""

    model: str
    weights: str | None = None
    img_size: int | None = None
    pruning: PruneConfig = field(default_factory=PruneConfig)
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    plan_record: dict = field(default_factory=dict, compare=False)
    # A weights file is recorded by absolute path and content hash (filled in from ``weights``):
    # the reference rebuilt later, from any directory, is the one exported or a clear error.
    weights_sha256: str | None = None
    # The artifacts written beside model.onnx for other runtimes, by runtime (e.g. ``openvino``:
    # its IR files with their sha256 and the compile options; see colln.export.openvino).
    artifacts: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.weights is None or self.weights in NAMED_WEIGHTS:
            return
        path = Path(self.weights)
        if not path.is_absolute():
            object.__setattr__(self, "weights", str(path.absolute()))
        if self.weights_sha256 is None and path.is_file():
            object.__setattr__(self, "weights_sha256", file_sha256(path))

    @property
    def output_names(self) -> tuple[str, ...]:
        return output_names(self.pruning, self.plan_record)

    def load_unpruned(self) -> nn.Module:
        from colln.models.registry import load_model

        if self.weights_sha256 is not None and Path(self.weights).is_file():
            found = file_sha256(Path(self.weights))
            if found != self.weights_sha256:
                raise WeightsError(
                    f"weights file {self.weights} changed since the export (sha256 {found[:12]}..., exported with "
                    f"{self.weights_sha256[:12]}...): restore that file or re-export with colln-export --force"
                )
        return load_model(self.model, self.weights, self.img_size)

    def apply(
        self,
        model: nn.Module,
    ) -> nn.Module:
        """``model`` pruned with this spec's config (a copy)."""
        from colln.models.rewrite import prune

        return prune(model, self.pruning)

    def load_pruned(self) -> nn.Module:
        """The pruned PyTorch reference (fp32)."""
        return self.apply(self.load_unpruned())

    def unpruned(self) -> ExportSpec:
        """The same model through the same path at keep 1.0, the speed baseline. No block is wrapped
        at keep 1.0, so the other prune settings would not change the graph: they are dropped. A
        tokens export keeps its output and feature layer: its baseline is the encoder cut at the
        same block, returning all patch tokens."""
        c = self.pruning
        return replace(self, pruning=PruneConfig(keep=1.0, output=c.output, feature_layer=c.feature_layer), plan_record={})

    def keep_plan(self) -> KeepPlan:
        return KeepPlan.from_dict(self.plan_record)

    def to_dict(self) -> dict:
        """export.json's fields; the plan under ``plan``, as report.json and a fine-tuning record
        name the keep plan too."""
        fields = {PLAN_KEY if k == "plan_record" else k: v for k, v in asdict(self).items()}
        return {**fields, "pruning": self.pruning.to_dict()}

    @classmethod
    def from_dict(
        cls,
        data: dict,
    ) -> ExportSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "plan_record"}
        known["plan_record"] = data.get(PLAN_KEY, {})
        # Older records (the checked-in latency baselines) keep the prune settings at the top level:
        # read them, not the defaults.
        known["pruning"] = PruneConfig.from_dict(data.get("pruning", data))
        return cls(**known)

    def write(
        self,
        directory: Path,
    ) -> None:
        # Through a temp file and a rename: a writer adding an artifact (colln.export.openvino.write_ir)
        # rewrites the export.json of a finished (or cached) export, which a failure must not truncate.
        atomic_write(Path(directory) / SPEC_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(
        cls,
        directory: Path,
    ) -> ExportSpec:
        path = Path(directory) / SPEC_FILE
        if not path.is_file():
            raise ExportDirError(f"{directory} is not a colln export (no {SPEC_FILE}); run colln-export first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, AttributeError, CollnError) as exc:
            raise ExportDirError(f"{path} is unreadable ({exc}); re-run colln-export with --force") from exc


def output_names(
    config: PruneConfig,
    plan: KeepPlan | dict | None = None,
) -> tuple[str, ...]:
    """The graph's outputs for ``config``: ``logits``, ``tokens`` and ``indices`` (and ``positions``
    for a VLM tower: its ``plan``'s dims have a token grid), or ``features``."""
    if config.output == "tokens":
        if isinstance(plan, dict):
            plan = KeepPlan.from_dict(plan) if plan else None
        tower = plan is not None and plan.dims.token_grid is not None
        return (TOKENS_NAME, INDICES_NAME, *((POSITIONS_NAME,) if tower else ()))
    return {"dense": (FEATURES_NAME,)}.get(config.output, (OUTPUT_NAME,))

"""The CollnError family.

Every error colln raises on purpose is a CollnError. The CLI prints
``colln: error: <stage>: <message>`` and exits 2; the message is one line that says what is wrong
and how to fix it.
"""

from __future__ import annotations


class CollnError(Exception):
    """Base class. ``stage`` names the pipeline step that refused (shown by the CLI)."""

    stage = "colln"
    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
    ) -> None:
        super().__init__(message)
        if stage is not None:
            self.stage = stage


class UsageError(CollnError):
    """A command-line argument is malformed."""

    stage = "arguments"


class PlanError(CollnError):
    """Keep rate, layers or metric do not make a valid keep plan."""

    stage = "plan"


class UnsupportedModelError(CollnError):
    """The model (or one of its blocks) is outside what the rewrite supports."""

    stage = "rewrite"


class ModelNotFoundError(CollnError):
    """No timm model or alias of that name."""

    stage = "model"


class WeightsError(CollnError):
    """Weights are missing, corrupt, mismatched, or cannot be downloaded."""

    stage = "weights"


class ExportError(CollnError):
    """ONNX export or checking failed."""

    stage = "export"


class OutputExistsError(CollnError):
    """The output directory exists and --force was not given."""

    stage = "output"


class BackendUnavailableError(CollnError):
    """A runtime backend (TensorRT, ONNX Runtime CUDA, PyTriton...) is not installed or usable."""

    stage = "backend"


class ValidationFailedError(CollnError):
    """Validation found mismatches. Exits 1, unlike the other errors."""

    stage = "validate"
    exit_code = 1


class DataError(CollnError):
    """Images or labelled data are missing, unreadable or do not fit the model."""

    stage = "data"


class ExportDirError(CollnError):
    """A directory is not a (complete, consistent) colln export."""

    stage = "export-dir"


class EngineError(CollnError):
    """A TensorRT plan cannot be built, or does not belong to this TensorRT/GPU."""

    stage = "tensorrt"


class RegressionFileError(CollnError):
    """A latency regression file (colln-bench ``--baseline FILE``: the speedups recorded with
    ``--save-baseline``) is missing, unreadable, or has no entry for the case measured. ("Baseline"
    in colln's code is the unpruned model; the stage keeps the option's name.)"""

    stage = "baseline"


class MeasurementError(CollnError):
    """A timing gave figures no machine can (a speedup outside the plausible range): the measurement
    failed, there is no result."""

    stage = "timing"


class NoFitError(CollnError):
    """No configuration of a sweep meets the latency budget or speedup target."""

    stage = "pick"


class TritonRepoError(CollnError):
    """A Triton model repository entry cannot be written."""

    stage = "triton"


class ServeError(CollnError):
    """The inference server cannot start or stopped unexpectedly."""

    stage = "serve"


class VizError(CollnError):
    """Selections cannot be drawn."""

    stage = "viz"


class PlanMismatchError(PlanError):
    """Fine-tuned weights are exported with a plan other than the one they were trained for."""


class CheckpointError(CollnError):
    """A fine-tuning checkpoint is missing, unreadable, or was made with other settings."""

    stage = "checkpoint"


class TrainingDivergedError(CollnError):
    """The fine-tuning loss stopped being finite."""

    stage = "finetune"


class CalibrationError(CollnError):
    """The int8 calibration set is empty, misshapen or unusable, or int8 cannot run where asked."""

    stage = "calibrate"

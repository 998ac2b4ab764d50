"""``report.json`` and ``report.md`` of an export directory (written by colln-export): built here
as a :class:`colln.report.schema.ExportReport`, whose classes are the schema
(docs/reference/report-json.md is generated from them).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from colln.export.artifact import Exported
from colln.export.onnx import topk_constants
from colln.export.spec import ONNX_FILE, PLAN_KEY
from colln.files import atomic_write
from colln.infer.environment import environment
from colln.models.plan import KeepPlan
from colln.report.render import report_markdown
from colln.report.schema import (
    SCHEMA,
    Calibration,
    Environment,
    Export,
    ExportReport,
    Flops,
    Latency,
    Model,
    Openvino,
    Operation,
    Stack,
    Tokens,
)
from colln.verify.validate import ValidationReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
DEFAULT_LM_PARAMS = 7e9  # a 7B language model (LLaVA-1.5-7B's Vicuna)


def build_report(
    exported: Exported,
    validation: ValidationReport | None,
    latency: Latency | None,
    lm_params: float = DEFAULT_LM_PARAMS,
    *,
    stack: Stack | None = None,
    calibration: Calibration | None = None,
    openvino: Openvino | None = None,
) -> ExportReport:
    """The report.json content. ``lm_params``: the language model a tokens export feeds, for the
    prefill FLOPs it saves."""
    import onnx

    from colln.data import data_config
    from colln.models.registry import default_weights

    spec, plan = exported.spec, exported.plan
    onnx_path = exported.directory / ONNX_FILE
    env = environment("onnxruntime", 0)
    return ExportReport(
        schema=SCHEMA,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=Model(
            name=spec.model,
            weights=spec.weights or default_weights(spec.model),
            input_size=list(data_config(exported.unpruned)["input_size"]),
            num_classes=int(getattr(exported.unpruned, "num_classes", 0)),
            params=int(sum(p.numel() for p in exported.unpruned.parameters())),
        ),
        export=Export(
            onnx=ONNX_FILE,
            onnx_bytes=_size(exported.directory, ONNX_FILE),
            opset=spec.opset,
            precision=spec.precision,
            topk_k=topk_constants(onnx.load(str(onnx_path), load_external_data=False)),
            spec={k: v for k, v in spec.to_dict().items() if k != PLAN_KEY},
            calibration=calibration,
        ),
        plan={**plan.to_dict(), "summary": str(plan)},
        operations=[Operation(layer=op.layer, kind=op.kind, count=op.count) for op in plan.operations],
        flops=Flops.from_dict(plan.flops().to_dict()),
        tokens=tokens_summary(plan, lm_params),
        validation=validation,
        latency=latency,
        stack=stack,
        versions=env["versions"],
        environment=Environment(
            **{k: env[k] for k in ("machine", "cpu", "cpu_flags", "cpus", "platform")}, loadavg=env["loadavg_after"]
        ),
        openvino=openvino,
    )


def tokens_summary(
    plan: KeepPlan,
    lm_params: float = DEFAULT_LM_PARAMS,
) -> Tokens | None:
    """What a tokens export hands a language model: K of N patch tokens, and the prefill FLOPs per
    image that saves (2 x params per token not fed). None for a logits export."""
    if plan.feature_block is None:
        return None
    return Tokens(
        feature_block=plan.feature_block,
        num_patches=plan.num_patches,
        k=plan.final_k,
        reduction=f"{plan.num_patches} -> {plan.final_k}",
        lm_params=lm_params,
        lm_prefill_flops_saved=plan.lm_prefill_flops_saved(lm_params),
    )


def _size(
    directory: Path,
    name: str,
) -> int:
    """Bytes of the graph, external data included."""
    return sum(p.stat().st_size for p in Path(directory).glob(f"{name}*") if p.is_file())


def write_report(
    directory: Path,
    report: ExportReport,
) -> None:
    atomic_write(Path(directory) / REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write(Path(directory) / REPORT_MD, report_markdown(report))

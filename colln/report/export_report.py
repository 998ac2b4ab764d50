"""``report.json`` and ``report.md`` of an export directory (written by colln-export).

report.json schema (``schema: 1``); ``null`` where a step was skipped::

    {
      "schema": 1,
      "created": "2026-11-24T23:10:00+00:00",          # UTC, ISO 8601
      "model": {"name": "digits_vit", "weights": "bundled" | "random" | "pretrained" | PATH,
                "input_size": [3, H, W], "num_classes": 10, "params": 402250},
      "export": {"onnx": "model.onnx", "onnx_bytes": 1634567, "opset": 18, "precision": "fp32",
                 "topk_k": [45, 32, 23], "spec": {...ExportSpec, as in export.json...},
                 "calibration": null | {"method": "minmax", "source", "images", "recipe"}},   # int8 only
      "plan": {...KeepPlan.to_dict(): layers, keep_rates, keep_counts, tokens_in, tokens_out,
               fuse, metric, norm, ..., "summary": "KeepPlan(colln, tokens 65 -> 46 -> ...)"},
      "flops": {"full": int, "pruned": int, "ratio": pruned/full, "bound": full/pruned},
      "tokens": null | {"feature_block", "num_patches", "k", "reduction": "576 -> 192",   # output tokens
                "lm_params", "lm_prefill_flops_saved": 2 * lm_params * (N - K)},     # per image
      "validation": null | {                          # colln.verify.validate.ValidationReport
        "backend", "reference": "torch", "precision", "images", "source", "passed",
        "tolerances": {"min_cosine", "logit_rtol", "tie_rtol"[, "max_accuracy_drop": int8 only]},
        "kept_sets_observed", "judged_images", "judged_required",
        "top1_agreement", "top1_agreement_judged", "max_abs_error", "mean_abs_error",
        "min_cosine", "mean_cosine", "min_cosine_judged", "max_abs_error_judged",   # *_judged: the
                                                      # judged images only; the others: all images
        "layers": [{"layer", "k", "min_margin", "min_relative_margin", "tied_images",
                    "compared_images", "mean_overlap", "identical_fraction",
                    "diverged_here", "explained"}],
        "unpruned_top1_agreement": {"torch": float, "<backend>": float},
        "accuracy": null | {"unpruned", "torch", "<backend>"},   # when labels are known
        "mismatches": [str], "warnings": [str]},
      "latency": null | {
        "backend": "onnxruntime-cpu", "threads": int | "backend default",
        "warmup": int, "flops_bound": float,           # rounds: in each LatencyStats
        "batches": {"<batch>": {"pruned": LatencyStats, "unpruned": LatencyStats,
                                "speedup": float, "speedup_iqr": [q25, q75]}}},
      "openvino": absent | {                          # --openvino
        "artifact": {"file": "openvino/model.xml", "precision", "inference_precision", "options", "sha256"},
        "validation": null | {...as "validation", backend "openvino"...}},
      "stack": null | {                               # int8 or --openvino exports: the variant stack
        "baseline": "unpruned-fp32", "variants": ["unpruned-fp32", "pruned-fp32", "unpruned-int8", "pruned-int8",
                                                  "openvino:unpruned-fp32", ...],   # "<runtime>:" off ONNX Runtime
        "flops_bound": float,
        "batches": {"<batch>": {"<variant>": LatencyStats + "speedup", "speedup_iqr",    # over unpruned fp32, one run
                                "speedup_same_runtime"}},    # over that runtime's unpruned variant, same precision
        "artifacts": {"<variant>": {"runtime", "artifact": path of the file timed, "options"}},
        "accuracy": {"source", "images", "accuracy": null | {"<variant>": float},
                     "top1_agreement": {"<variant>": float}}},                        # with unpruned fp32
      "versions": {"python", "colln", "torch", "timm", "onnx", "onnxruntime", ...},
      "environment": {"machine", "cpu", "cpu_flags": null | {"<flag>": bool}, "cpus", "platform", "loadavg": [1, 5, 15 min]}
    }

LatencyStats is ``{"batch", "rounds", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"}``.
``speedup`` is the median of per-round ``unpruned / pruned`` time ratios: both models are timed in
the same run, interleaved in shuffled order, so machine-load drifts hit both alike. For an int8
export, ``latency.batches`` compares pruned int8 with unpruned int8, and ``stack`` times all four
variants in one interleaved run (speedups over unpruned fp32).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from colln.export.artifact import Exported
from colln.export.onnx import topk_constants
from colln.export.spec import ONNX_FILE
from colln.files import atomic_write
from colln.infer.environment import environment
from colln.models.plan import KeepPlan
from colln.report.render import report_markdown
from colln.verify.validate import ValidationReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SCHEMA = 1
DEFAULT_LM_PARAMS = 7e9  # a 7B language model (LLaVA-1.5-7B's Vicuna)


def build_report(
    exported: Exported,
    validation: ValidationReport | None,
    latency: dict | None,
    lm_params: float = DEFAULT_LM_PARAMS,
    *,
    stack: dict | None = None,
    calibration: dict | None = None,
) -> dict:
    """The report.json content (see the module docstring for the schema). ``lm_params``: the
    language model a tokens export feeds, for the prefill FLOPs it saves."""
    import onnx

    from colln.data import data_config
    from colln.models.registry import default_weights

    spec, plan = exported.spec, exported.plan
    onnx_path = exported.directory / ONNX_FILE
    flops = plan.flops().to_dict()
    env = environment("onnxruntime", 0)
    if latency is not None:
        latency = {**latency, "flops_bound": flops["bound"]}
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": spec.model,
            "weights": spec.weights or default_weights(spec.model),
            "input_size": list(data_config(exported.unpruned)["input_size"]),
            "num_classes": int(getattr(exported.unpruned, "num_classes", 0)),
            "params": int(sum(p.numel() for p in exported.unpruned.parameters())),
        },
        "export": {
            "onnx": ONNX_FILE,
            "onnx_bytes": _size(exported.directory, ONNX_FILE),
            "opset": spec.opset,
            "precision": spec.precision,
            "topk_k": topk_constants(onnx.load(str(onnx_path), load_external_data=False)),
            "spec": {k: v for k, v in spec.to_dict().items() if k != "plan"},
            "calibration": calibration,
        },
        "plan": {**plan.to_dict(), "summary": str(plan)},
        "flops": flops,
        "tokens": tokens_summary(plan, lm_params),
        "validation": validation.to_dict() if validation is not None else None,
        "latency": latency,
        "stack": stack,
        "versions": env.pop("versions"),
        "environment": {
            **{k: env[k] for k in ("machine", "cpu", "cpu_flags", "cpus", "platform")},
            "loadavg": env["loadavg_after"],
        },
    }


def tokens_summary(
    plan: KeepPlan,
    lm_params: float = DEFAULT_LM_PARAMS,
) -> dict | None:
    """What a tokens export hands a language model: K of N patch tokens, and the prefill FLOPs per
    image that saves (2 x params per token not fed). None for a logits export."""
    if plan.feature_block is None:
        return None
    return {
        "feature_block": plan.feature_block,
        "num_patches": plan.num_patches,
        "k": plan.final_k,
        "reduction": f"{plan.num_patches} -> {plan.final_k}",
        "lm_params": lm_params,
        "lm_prefill_flops_saved": plan.lm_prefill_flops_saved(lm_params),
    }


def _size(
    directory: Path,
    name: str,
) -> int:
    """Bytes of the graph, external data included."""
    return sum(p.stat().st_size for p in Path(directory).glob(f"{name}*") if p.is_file())


def write_report(
    directory: Path,
    report: dict,
) -> None:
    atomic_write(Path(directory) / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    atomic_write(Path(directory) / REPORT_MD, report_markdown(report))

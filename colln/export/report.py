"""``report.json`` and ``report.md`` of an export directory (written by colln-export).

report.json schema (``schema: 1``); ``null`` where a step was skipped::

    {
      "schema": 1,
      "created": "2026-11-24T23:10:00+00:00",          # UTC, ISO 8601
      "model": {"name": "digits_vit", "weights": "bundled" | "random" | "pretrained" | PATH,
                "input_size": [3, H, W], "num_classes": 10, "params": 402250},
      "export": {"onnx": "model.onnx", "onnx_bytes": 1634567, "opset": 18, "precision": "fp32",
                 "topk_k": [45, 32, 23], "spec": {...ExportSpec, as in export.json...}},
      "plan": {...KeepPlan.to_dict(): layers, keep_rates, keep_counts, tokens_in, tokens_out,
               fuse, metric, norm, ..., "summary": "KeepPlan(colln, tokens 65 -> 46 -> ...)"},
      "flops": {"full": int, "pruned": int, "ratio": pruned/full, "bound": full/pruned},
      "validation": null | {                          # colln.runtime.validate.ValidationReport
        "backend", "reference": "torch", "precision", "images", "source", "passed",
        "tolerances": {"min_cosine", "logit_rtol", "tie_rtol"},
        "kept_sets_observed", "judged_images",
        "top1_agreement", "top1_agreement_judged", "max_abs_error", "mean_abs_error",
        "min_cosine", "mean_cosine", "min_cosine_judged",
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
      "versions": {"python", "colln", "torch", "timm", "onnx", "onnxruntime", ...},
      "environment": {"machine", "cpu", "cpus", "platform", "loadavg": [1, 5, 15 min]}
    }

LatencyStats is ``{"batch", "rounds", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"}``.
``speedup`` is the median of per-round ``unpruned / pruned`` time ratios: both models are timed in
the same run, interleaved in shuffled order, so machine-load drifts hit both alike.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colln.export.onnx import topk_constants
from colln.export.pipeline import Exported
from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.runtime.validate import ValidationReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SCHEMA = 1


def measure_latency(
    pruned_onnx: Path,
    unpruned_onnx: Path,
    input_size: Sequence[int],
    batches: Sequence[int] = (1, 8),
    rounds: int | None = None,
    warmup: int = 3,
    threads: int | None = None,
    budget_s: float = 20.0,
) -> dict:
    """ONNX Runtime (CPU) latency of the pruned and the unpruned graph, interleaved, per batch size.

    ``rounds=None`` picks, per batch size, as many rounds as fit in ``budget_s`` (5 to 50), judged
    from one untimed call of each graph: a ViT-B round at batch 8 can take seconds on a CPU."""
    from colln.runtime.bench import pruned_vs_unpruned, timed_infer
    from colln.runtime.runners import onnxruntime_runner

    rng = np.random.default_rng(0)
    out: dict[str, dict] = {}
    pruned_runner = onnxruntime_runner(pruned_onnx, threads=threads)
    unpruned_runner = onnxruntime_runner(unpruned_onnx, threads=threads)
    with pruned_runner as pruned, unpruned_runner as unpruned:
        for b in batches:
            feed = {INPUT_NAME: rng.standard_normal((b, *input_size), dtype=np.float32)}
            first = timed_infer(pruned, feed) + timed_infer(unpruned, feed)
            n = rounds if rounds is not None else int(np.clip(budget_s / first, 5, 50))
            out[str(b)] = pruned_vs_unpruned(pruned, unpruned, feed, n, max(warmup - 1, 0))
    return {
        "backend": "onnxruntime-cpu",
        "threads": threads or "backend default",
        "warmup": warmup,
        "batches": out,
    }


def build_report(
    exported: Exported,
    validation: ValidationReport | None,
    latency: dict | None,
) -> dict:
    """The report.json content (see the module docstring for the schema)."""
    import onnx

    from colln.data import data_config
    from colln.models.registry import default_weights
    from colln.runtime.bench import environment

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
        },
        "plan": {**plan.to_dict(), "summary": str(plan)},
        "flops": flops,
        "validation": validation.to_dict() if validation is not None else None,
        "latency": latency,
        "versions": env.pop("versions"),
        "environment": {**{k: env[k] for k in ("machine", "cpu", "cpus", "platform")}, "loadavg": env["loadavg_after"]},
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
    (Path(directory) / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (Path(directory) / REPORT_MD).write_text(markdown(report))


def markdown(
    report: dict,
) -> str:
    """A short human summary of report.json."""
    m, plan, f = report["model"], report["plan"], report["flops"]
    lines = [
        f"# {m['name']}: {plan['metric']} keep plan",
        "",
        f"- Plan: {plan['summary']}",
        f"- FLOPs: {f['pruned'] / 1e9:.3g} G of {f['full'] / 1e9:.3g} G per image (bound {f['bound']:.2f}x)",
        f"- ONNX: `{report['export']['onnx']}`, opset {report['export']['opset']}, {report['export']['precision']}, "
        f"TopK K = {report['export']['topk_k']}",
        f"- Weights: {m['weights']}",
    ]
    v = report["validation"]
    if v is not None:
        lines += ["", f"## Validation: {'passed' if v['passed'] else 'FAILED'} ({v['backend']} vs torch, {v['images']} images, {v['source']})", ""]
        lines += [f"- {line}" for line in validation_lines(v)]
        lines += [f"- mismatch: {x}" for x in v["mismatches"]] + [f"- warning: {x}" for x in v["warnings"]]
    lat = report["latency"]
    if lat is not None:
        lines += ["", f"## Latency ({lat['backend']}, threads: {lat['threads']}, pruned and unpruned interleaved)", ""]
        lines += ["| batch | rounds | pruned p50 ms | unpruned p50 ms | pruned p90 ms | unpruned p90 ms | speedup | FLOPs bound |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for b, r in lat["batches"].items():
            lines.append(
                f"| {b} | {r['pruned']['rounds']} | {r['pruned']['p50_ms']:.2f} | {r['unpruned']['p50_ms']:.2f} | "
                f"{r['pruned']['p90_ms']:.2f} | {r['unpruned']['p90_ms']:.2f} | {r['speedup']:.2f}x | {lat['flops_bound']:.2f}x |"
            )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def validation_lines(
    v: dict,
) -> list[str]:
    """The validation numbers as short lines (report.md and the CLI table share them)."""
    judged = f"{v['judged_images']}/{v['images']} images judged"
    lines = [
        f"top-1 agreement {v['top1_agreement']:.4f} ({judged})",
        f"logits: max |err| {v['max_abs_error']:.3g}, mean |err| {v['mean_abs_error']:.3g}, min cosine {v['min_cosine']:.6f}",
    ]
    for layer in v["layers"]:
        kept = "" if layer["identical_fraction"] is None else f", identical kept sets {layer['identical_fraction']:.3f}"
        margin = "n/a" if layer["min_relative_margin"] is None else f"{layer['min_relative_margin']:.2g}"
        lines.append(f"layer {layer['layer']} (k={layer['k']}): min relative margin {margin}{kept}")
    agree = ", ".join(f"{k} {x:.3f}" for k, x in v["unpruned_top1_agreement"].items())
    lines.append(f"top-1 agreement with the unpruned model: {agree}")
    if v["accuracy"]:
        lines.append("accuracy: " + ", ".join(f"{k} {x:.4f}" for k, x in v["accuracy"].items()))
    return lines

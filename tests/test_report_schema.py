"""report.json's dataclasses (colln.report.schema): the docs page is the one they generate, they
read back every field colln-export writes, and report.md is rendered from the typed view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colln.report.render import operation_lines, report_markdown
from colln.report.schema import ExportReport, Operation, Stack, schema_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "report-json.md"


def test_the_schema_page_is_generated_from_the_dataclasses() -> None:
    assert PAGE.read_text(encoding="utf-8") == schema_markdown(), (
        "docs/reference/report-json.md differs from the dataclasses: run "
        "`python -m colln.report.schema > docs/reference/report-json.md`"
    )


def test_the_page_lists_every_section_and_field() -> None:
    page = schema_markdown()
    for name in ("ExportReport", "Latency", "LatencyPair", "LatencyStats", "ValidationReport", "LayerCheck", "Stack"):
        assert f"\n### {name}\n" in page
    assert "| `max_abs_error_judged` |" in page and "| `speedup_same_runtime` |" in page and "| `passed` | bool |" in page


def test_report_json_reads_back_whole(digits_export: Path) -> None:
    """Every key colln-export wrote is a field of the typed report: reading and writing it again
    gives the same JSON, and report.md is the rendering of that typed view."""
    data = json.loads((digits_export / "report.json").read_text())
    report = ExportReport.from_dict(data)
    assert report.to_dict() == data
    assert report.latency is not None and set(report.latency.batches) == {"1", "4"}
    assert report.latency.batches["4"].pruned.batch == 4 and report.validation is not None and report.validation.passed
    assert report_markdown(report) == (digits_export / "report.md").read_text()


def test_an_unknown_key_is_refused(digits_export: Path) -> None:
    data = json.loads((digits_export / "report.json").read_text())
    data["latency"]["batches"]["1"]["speedup_typo"] = 1.0
    with pytest.raises(ValueError, match="LatencyPair has no field speedup_typo"):
        ExportReport.from_dict(data)


def test_a_stack_without_accuracy_leaves_the_key_out() -> None:
    """colln-bench's stack has no ``accuracy``: it reads back without one and writes none."""
    row = {"batch": 1, "rounds": 3, "p50_ms": 2.0, "p90_ms": 2.5, "p99_ms": 3.0, "mean_ms": 2.1, "images_per_s": 500.0}
    data = {
        "baseline": "unpruned-fp32",
        "variants": ["unpruned-fp32"],
        "flops_bound": 1.5,
        "batches": {
            "1": {
                "unpruned-fp32": {
                    **row,
                    "speedup": 1.0,
                    "speedup_iqr": [1.0, 1.0],
                    "speedup_same_runtime": 1.0,
                    "speedup_same_runtime_iqr": [1.0, 1.0],
                }
            }
        },
        "artifacts": None,
    }
    stack = Stack.from_dict(data)
    assert stack.accuracy is None and stack.batches["1"]["unpruned-fp32"].p50_ms == 2.0
    assert stack.to_dict() == data


def test_the_report_lists_the_plan_operations(digits_export: Path) -> None:
    """report.json's operations are the plan's (keep 0.7 prunes at every one of its layers), and
    report.md has one line per operation."""
    data = json.loads((digits_export / "report.json").read_text())
    plan = data["plan"]
    assert data["operations"] == [
        {"layer": i, "kind": "prune", "count": k} for i, k in zip(plan["layers"], plan["keep_counts"], strict=True)
    ]
    assert plan["operations"] == [[i, "prune", k] for i, k in zip(plan["layers"], plan["keep_counts"], strict=True)]
    md = (digits_export / "report.md").read_text()
    assert "\n".join(f"  - block {i}: prune, keep {k}" for i, k in zip(plan["layers"], plan["keep_counts"])) in md


def test_one_line_per_operation() -> None:
    ops = [Operation(layer=3, kind="prune", count=96), Operation(layer=5, kind="tome", count=8)]
    ops += [Operation(layer=7, kind="merge", count=40), Operation(layer=10, kind="select", count=60)]
    assert operation_lines(ops) == [
        "block 3: prune, keep 96",
        "block 5: tome, merge 8",
        "block 7: merge, keep 40",
        "block 10: select 60",
    ]
    assert operation_lines([]) == ["none: every block passes the tokens through"]

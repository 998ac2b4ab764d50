"""Latency regression check (``pytest -m perf``; not in the default run): every case recorded in
``benchmarks/baselines/<machine>.json`` is exported afresh from the current code, timed with
colln-bench against its unpruned counterpart, and its speedup and efficiency must not fall more
than ``COLLN_PERF_TOLERANCE`` (default 0.10) below the baseline. Record or refresh a case with
``colln-bench EXPORT --save-baseline benchmarks/baselines/<machine>.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from colln.export.artifact import export_into
from colln.export.spec import ExportSpec
from colln.files import atomic_dir
from colln.infer.environment import machine_id
from colln.infer.timing import Timing
from colln.measure.bench import bench_export, regressions

pytestmark = pytest.mark.perf

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / f"{machine_id()}.json"


def _cases() -> list:
    if not BASELINE.is_file():
        reason = f"no baseline for machine {machine_id()}: record one with colln-bench EXPORT --save-baseline {BASELINE}"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-baseline")]
    return [pytest.param(c, id=c["case"]) for c in json.loads(BASELINE.read_text())["cases"]]


@pytest.mark.parametrize("case", _cases())
def test_no_latency_regression(case: dict, tmp_path: Path) -> None:
    tolerance = float(os.environ.get("COLLN_PERF_TOLERANCE", "0.10"))
    export = tmp_path / "export"
    with atomic_dir(export, marker="export.json") as tmp:
        export_into(ExportSpec.from_dict(case["spec"]), tmp)
    report = bench_export(
        export,
        backend=case["backend"],
        batches=[int(b) for b in case["batches"]],
        timing=Timing.from_dict(case),
        cache=tmp_path / "cache",
    )
    found = regressions(report, case, tolerance)
    for batch, r in report["batches"].items():
        print(
            f"{case['case']} batch {batch}: speedup {r['speedup']:.3f} "
            f"(baseline {case['batches'][batch]['speedup']:.3f}), bound {r['bound']:.3f}"
        )
    assert not found, f"latency regression against {BASELINE.name}: " + "; ".join(found)

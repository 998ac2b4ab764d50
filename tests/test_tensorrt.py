"""TensorRT: real parses and builds of the pruned digits_vit graph with the TensorRT available here
(TensorRT-RTX on CPU machines: its parser and builder need no GPU), polygraphy's capability
report, plan metadata, refusal of foreign plans, the no-TensorRT exit, and GPU engine runs
(marked ``gpu``) against the PyTorch reference."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from colln.app.build_cli import main as build_main
from colln.errors import BackendUnavailableError, EngineError, ExportDirError, UsageError
from colln.export.artifact import export_into
from colln.export.spec import ONNX_FILE, ExportSpec
from colln.export.tensorrt import (
    ENGINE_FILE,
    ENGINE_LOG_FILE,
    ENGINE_META_FILE,
    FAILED_LOG_FILE,
    build_engine,
    engine_runner,
    gpu_info,
    polygraphy_trt,
    trt_module,
)
from colln.infer import runners
from colln.infer.runners import tensorrt_runner
from colln.models import bundled
from colln.models.config import PruneConfig

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 2, 4)  # a narrow profile keeps the CPU builds at a few seconds
NO_GPU = "needs an NVIDIA GPU (TensorRT engines only run on one)"
# Decided at collection, so the skipped GPU tests do not build their fixtures first.
HAS_GPU = gpu_info() is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)


def _paper_keep_counts(
    patches: int = 64,
    keep: float = 0.7,
    stages: int = 3,
) -> list[int]:
    """k = ceil(keep * candidates) at each pruning block (digits_vit: 8x8 patches, 3 stages)."""
    counts = []
    for _ in range(stages):
        patches = math.ceil(keep * patches)
        counts.append(patches)
    return counts


def _copy_export(
    src: Path,
    dst: Path,
) -> Path:
    """Export dirs are shared: builds go into a private copy."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    return dst


@pytest.fixture(scope="module")
def fp32_export(digits_export, tmp_path_factory) -> Path:
    """The shared fp32 digits_vit export (conftest), copied: builds write into it."""
    return _copy_export(digits_export, tmp_path_factory.mktemp("trt") / "digits-fp32")


@pytest.fixture(scope="module")
def fp32_plan(fp32_export, tmp_path_factory) -> Path:
    """fp32_export with model.plan built once for the module, with its own timing cache."""
    built = _copy_export(fp32_export, tmp_path_factory.mktemp("trt") / "built")
    build_engine(built, *BATCHES, timing_cache=built.parent / "timing.cache")
    return built


@pytest.fixture(scope="module")
def fp16_plan(tmp_path_factory, digits_weights) -> Path:
    """The fp16 graph of ``--precision fp16`` (strongly typed), built like fp32_plan."""
    out = tmp_path_factory.mktemp("trt") / "digits-fp16"
    out.mkdir()
    export_into(ExportSpec(model="digits_vit", weights=digits_weights, pruning=PruneConfig(keep=0.7), precision="fp16"), out)
    build_engine(out, *BATCHES, timing_cache=out.parent / "timing.cache")
    return out


def _network(
    onnx_path: Path,
):
    """The TensorRT network of ``onnx_path``, parsed by polygraphy (strongly typed)."""
    with polygraphy_trt():  # as colln does: polygraphy's TensorRT backend pointed at TensorRT-RTX
        from polygraphy.backend.trt import NetworkFromOnnxPath

        return NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()


def test_falls_back_to_tensorrt_rtx_without_tensorrt():
    pytest.importorskip("tensorrt_rtx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("full TensorRT is installed, so it is the one used")
    from polygraphy import config

    before = config.USE_TENSORRT_RTX
    assert trt_module().name == "tensorrt_rtx" and before == config.USE_TENSORRT_RTX
    with polygraphy_trt() as flavour:
        assert flavour.name == "tensorrt_rtx" and config.USE_TENSORRT_RTX
    assert before == config.USE_TENSORRT_RTX  # on only while colln uses it


def test_engine_runner_points_polygraphy_at_tensorrt_rtx_only_inside_its_calls(tmp_path, monkeypatch):
    """polygraphy's runner reads its switch in activate, infer and deactivate (which API a TensorRT
    version has): each call sees it on, the caller sees it as it was (runs without a GPU: the
    runner's own calls are replaced by probes of the switch)."""
    if trt_module().name != "tensorrt_rtx":
        pytest.skip("the switch is TensorRT-RTX's; full TensorRT is in use")
    from polygraphy import config

    before = config.USE_TENSORRT_RTX
    runner = engine_runner(tmp_path / ENGINE_FILE, "probe", trt_module())
    from polygraphy.backend.trt import TrtRunner

    seen = []
    for name in ("activate_impl", "deactivate_impl"):
        monkeypatch.setattr(TrtRunner, name, lambda self, name=name: seen.append((name, config.USE_TENSORRT_RTX)))
    monkeypatch.setattr(TrtRunner, "infer_impl", lambda self, feed, **kw: seen.append(("infer_impl", config.USE_TENSORRT_RTX)))
    runner.activate_impl()
    assert before == config.USE_TENSORRT_RTX
    runner.infer_impl({}, copy_outputs_to_host=True)
    runner.deactivate_impl()
    assert seen == [("activate_impl", True), ("infer_impl", True), ("deactivate_impl", True)]
    assert before == config.USE_TENSORRT_RTX


def test_pruned_graph_parses_with_static_token_counts(fp32_export):
    trt = trt_module().module
    spec = ExportSpec.read(fp32_export)
    _, network, _ = _network(fp32_export / ONNX_FILE)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    # One TopK per pruning layer (colln metric); its index output keeps exactly the plan's k tokens.
    topk_widths = [layer.get_output(1).shape[-1] for layer in layers if layer.type == trt.LayerType.TOPK]
    assert topk_widths == list(spec.keep_plan().keep_counts)
    assert tuple(network.get_input(0).shape) == (-1, 3, 32, 32)
    assert tuple(network.get_output(0).shape) == (-1, 10)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_polygraphy_capability_reports_full_support(precision, request):
    export_dir = request.getfixturevalue("fp32_export" if precision == "fp32" else "fp16_plan")
    env = {**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": "1" if trt_module().name == "tensorrt_rtx" else "0"}
    polygraphy = Path(sys.executable).parent / "polygraphy"
    result = subprocess.run(
        [str(polygraphy), "inspect", "capability", str(export_dir / ONNX_FILE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Graph is fully supported by TensorRT" in result.stdout + result.stderr


def test_fp32_plan_and_metadata(fp32_plan):
    flavour = trt_module()
    spec = ExportSpec.read(fp32_plan)
    meta = json.loads((fp32_plan / ENGINE_META_FILE).read_text())
    assert (fp32_plan / ENGINE_FILE).stat().st_size > (fp32_plan / ONNX_FILE).stat().st_size / 2
    assert meta["tensorrt"] == {"flavour": flavour.name, "version": flavour.version}
    assert meta["gpu"] == gpu_info()
    assert meta["precision"] == "fp32"
    assert meta["strongly_typed"] is True
    assert meta["io"] == {"images": "float32", "logits": "float32"}
    assert meta["profile"] == {
        "input": "images",
        "min": [1, 3, 32, 32],
        "opt": [2, 3, 32, 32],
        "max": [4, 3, 32, 32],
    }
    assert meta["keep_plan"] == spec.plan_record and meta["keep_plan"]["keep_counts"] == _paper_keep_counts()
    assert meta["onnx_sha256"] == hashlib.sha256((fp32_plan / ONNX_FILE).read_bytes()).hexdigest()
    log = (fp32_plan / ENGINE_LOG_FILE).read_text()
    assert "Building engine" in log and "STRONGLY_TYPED" in log
    assert Path(meta["timing_cache"]).is_file()
    assert not list(fp32_plan.glob(".*")), "temporary files left behind"


def test_fp16_plan_is_strongly_typed_fp16(fp16_plan):
    trt = trt_module().module
    meta = json.loads((fp16_plan / ENGINE_META_FILE).read_text())
    assert meta["precision"] == "fp16" and meta["strongly_typed"] is True
    # The fp16 graph keeps float32 at its edges, so callers feed the same arrays as for fp32.
    assert meta["io"] == {"images": "float32", "logits": "float32"}
    assert meta["keep_plan"]["keep_counts"] == _paper_keep_counts()
    # Strongly typed: TensorRT runs each layer in the graph's type. Products are fp16; the Col-Ln
    # scores reach TopK in fp32.
    _, network, _ = _network(fp16_plan / ONNX_FILE)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    products = [layer for layer in layers if layer.type in (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.CONVOLUTION)]
    assert products and {layer.get_output(0).dtype for layer in products} == {trt.float16}
    topks = [layer for layer in layers if layer.type == trt.LayerType.TOPK]
    assert len(topks) == 3 and {layer.get_input(0).dtype for layer in topks} == {trt.float32}
    assert "Building engine" in (fp16_plan / ENGINE_LOG_FILE).read_text()


def test_colln_build_rebuilds_with_the_timing_cache(fp32_plan, tmp_path, capsys):
    built = _copy_export(fp32_plan, tmp_path / "again")
    cache = fp32_plan.parent / "timing.cache"
    rc = build_main([str(built), "--batch-min", "2", "--batch-opt", "2", "--batch-max", "2", "--timing-cache", str(cache)])
    assert rc == 0
    meta = json.loads((built / ENGINE_META_FILE).read_text())
    assert meta["profile"]["min"] == meta["profile"]["max"] == [2, 3, 32, 32]
    log = (built / ENGINE_LOG_FILE).read_text()
    assert f"Loading tactic timing cache from {cache}" in log
    assert "not found" not in log
    assert f"with {trt_module().label} (fp32, batch 2/2/2)" in capsys.readouterr().err


def test_bad_profile_is_a_usage_error(fp32_export):
    with pytest.raises(UsageError, match="min <= opt <= max"):
        build_engine(fp32_export, batch_min=4, batch_opt=2, batch_max=8)
    assert not (fp32_export / ENGINE_FILE).exists()


def test_failed_build_keeps_the_previous_plan(fp32_plan, tmp_path):
    out = _copy_export(fp32_plan, tmp_path / "broken")
    before = {name: (out / name).read_bytes() for name in (ENGINE_FILE, ENGINE_META_FILE, ENGINE_LOG_FILE)}
    onnx_path = out / ONNX_FILE
    # A readable graph with its keep plan (build checks both first) that TensorRT cannot parse.
    graph = onnx.load(str(onnx_path))
    graph.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(graph, str(onnx_path))
    with pytest.raises(EngineError, match=r"could not build model\.onnx: .*While parsing node .*NoSuchOperator"):
        build_engine(out, *BATCHES, timing_cache=tmp_path / "timing.cache")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert "[E]" in (out / FAILED_LOG_FILE).read_text()
    assert not list(out.glob(".*")), "temporary files left behind"


def _doctored(
    fp32_plan: Path,
    tmp_path: Path,
    **changes,
) -> Path:
    out = _copy_export(fp32_plan, tmp_path / "doctored")
    meta = json.loads((out / ENGINE_META_FILE).read_text())
    for key, value in changes.items():
        meta[key] = value
    (out / ENGINE_META_FILE).write_text(json.dumps(meta))
    return out


def test_plan_from_another_tensorrt_version_is_refused(fp32_plan, tmp_path):
    flavour = trt_module()
    out = _doctored(fp32_plan, tmp_path, tensorrt={"flavour": flavour.name, "version": "0.9.0"})
    with pytest.raises(EngineError, match=r"built with .* 0\.9\.0 but this machine runs .*colln-build"):
        runners.open_runner(out, backend="tensorrt")


def test_plan_from_another_tensorrt_flavour_is_refused(fp32_plan, tmp_path):
    other = "tensorrt" if trt_module().name == "tensorrt_rtx" else "tensorrt_rtx"
    out = _doctored(fp32_plan, tmp_path, tensorrt={"flavour": other, "version": trt_module().version})
    with pytest.raises(EngineError, match="built with"):
        tensorrt_runner(out)


def test_plan_of_another_onnx_is_refused(fp32_plan, tmp_path):
    out = _doctored(fp32_plan, tmp_path, onnx_sha256="0" * 64)
    with pytest.raises(EngineError, match=r"another model\.onnx"):
        tensorrt_runner(out)


def test_incomplete_plan_is_refused(fp32_plan, tmp_path):
    out = _copy_export(fp32_plan, tmp_path / "incomplete")
    (out / ENGINE_META_FILE).unlink()
    with pytest.raises(ExportDirError, match="colln-build"):
        tensorrt_runner(out)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
def test_without_gpu_the_runner_says_so(fp32_plan):
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU"):
        runners.open_runner(fp32_plan, backend="tensorrt")


def _run_without_tensorrt(
    tmp_path: Path,
    *args: str,
) -> list[str]:
    """A real run with imports of tensorrt and tensorrt_rtx blocked (no mocks); asserts exit 2 and
    returns stderr's lines."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['tensorrt'] = None\nsys.modules['tensorrt_rtx'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    env.pop("POLYGRAPHY_USE_TENSORRT_RTX", None)
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()


def _assert_install_hint(
    lines: list[str],
) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("colln: error: backend: TensorRT is not installed")
    assert "pip install 'colln[trt]'" in lines[0] and "'colln[trt-rtx]'" in lines[0]


def test_without_tensorrt_colln_build_exits_2_with_install_hint(fp32_export, tmp_path):
    target = _copy_export(fp32_export, tmp_path / "export")
    before = sorted(p.name for p in target.iterdir())
    _assert_install_hint(_run_without_tensorrt(tmp_path, "colln.app.build_cli", str(target)))
    assert sorted(p.name for p in target.iterdir()) == before and ENGINE_FILE not in before


def test_without_tensorrt_export_trt_fails_before_exporting(tmp_path):
    out = tmp_path / "out"
    _assert_install_hint(
        _run_without_tensorrt(tmp_path, "colln.app.export_cli", "digits_vit", "--keep", "0.7", "--trt", "--out", str(out))
    )
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["site"]


# --- GPU: engines run (skipped here: no GPU on the CI machine) ---------------------------------


def _digits_batch(
    model,
) -> np.ndarray:
    from colln.data import preprocess

    return preprocess(bundled.load_split("test").images[:256], model).numpy()


def _logits(
    runner,
    images: np.ndarray,
) -> np.ndarray:
    with runner:
        return runners.run(runner, images, batch=4)


@pytest.mark.gpu
@needs_gpu
def test_fp32_engine_matches_torch(fp32_plan):
    spec = ExportSpec.read(fp32_plan)
    torch_runner = runners.open_runner(fp32_plan, backend="torch")
    images = _digits_batch(spec.load_unpruned())
    expected = _logits(torch_runner, images)
    got = _logits(runners.open_runner(fp32_plan, backend="tensorrt"), images)
    assert got.shape == expected.shape == (len(images), 10)
    # TF32 matmuls: close, not bit-exact; same predictions.
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


@pytest.mark.gpu
@needs_gpu
def test_fp16_engine_agrees_with_torch(fp16_plan):
    spec = ExportSpec.read(fp16_plan)
    images = _digits_batch(spec.load_unpruned())
    expected = _logits(runners.open_runner(fp16_plan, backend="torch"), images)
    got = _logits(runners.open_runner(fp16_plan, backend="tensorrt"), images)
    assert got.dtype == np.float32 and got.shape == expected.shape
    # fp16 products against the fp32 reference: a few near-ties may flip, most predictions agree.
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.97
    assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()


@pytest.mark.gpu
@needs_gpu
def test_plan_for_another_gpu_is_refused(fp32_plan, tmp_path):
    out = _doctored(fp32_plan, tmp_path, gpu={"name": "Imaginary GPU", "compute_capability": "1.0"}, compute_capabilities=["1.0"])
    with pytest.raises(EngineError, match=r"compute capability 1\.0"):
        tensorrt_runner(out)

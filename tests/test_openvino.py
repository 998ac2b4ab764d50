"""OpenVINO as a backend: the IR colln-export --openvino writes (fp32, bf16, NNCF int8 with the
selection float), its runner and validation, the manifest and its checks, Triton's OpenVINO entry,
the stacked timing across runtimes and the bad inputs.

References are independent of the code under test: the IR's ops are read back with OpenVINO's own
API, kept sets and logits are compared with PyTorch by the shared validation rule, the Triton
config is parsed with Triton's ModelConfig protobuf, and NNCF's default placement (no ignored
scope) is shown to be caught by the same check that passes colln's IR.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from colln.app.export_cli import main as export_main  # noqa: E402
from colln.app.validate_cli import main as validate_main  # noqa: E402
from colln.data import pick, validation_images  # noqa: E402
from colln.errors import CalibrationError, ExportDirError, ExportError, UsageError  # noqa: E402
from colln.export.artifact import read_export  # noqa: E402
from colln.export.openvino import (  # noqa: E402
    IR_FILE,
    WEIGHTS_FILE,
    compile_model,
    convert,
    quantize,
    selection_crossings,
    selection_path,
    write_ir,
)
from colln.export.spec import file_sha256  # noqa: E402
from colln.export.triton import write_model_repository  # noqa: E402
from colln.export.unpruned import cached_export, default_cache  # noqa: E402
from colln.infer.runners import open_runner, openvino_runner, run  # noqa: E402
from colln.infer.timing import Timing  # noqa: E402
from colln.measure import bench  # noqa: E402
from colln.measure.bench import Variant, bench_export, stack_exports  # noqa: E402
from colln.report.schema import ExportReport, Stack  # noqa: E402
from colln.verify.validate import TOLERANCES, validate, validate_export  # noqa: E402

DIGITS = ["digits_vit", "--keep", "0.7", "--weights", "bundled", "--no-latency"]


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ov") / "digits-fp32"
    assert export_main([*DIGITS, "--openvino", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ov") / "digits-int8"
    # Passes validation (exit 0): NNCF with accuracy control on the labelled digits, judged by the int8 rule.
    argv = [*DIGITS, "--precision", "int8", "--calib-limit", "100", "--openvino", "--out", str(out)]
    assert export_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def int8_bf16_export(int8_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int8 export with its IR rewritten at int8-bf16 as colln-export writes it (NNCF with
    accuracy control on the cached fp32 counterpart, calibrated on the same 100 images, the drop
    measured on the 450 labelled validation images): one NNCF run, no new export."""
    copy = shutil.copytree(int8_export, tmp_path_factory.mktemp("ov") / "digits-int8-bf16")
    spec = read_export(copy)
    labelled = validation_images(spec.model, spec.load_unpruned())
    source = cached_export(replace(spec, precision="fp32", plan_record={}), default_cache(int8_export))
    calibration = labelled.images[pick(len(labelled.images), 100)]  # --calib-limit 100's images
    write_ir(copy, "int8-bf16", calibration, source=source / "model.onnx", validation=(labelled.images, labelled.labels))
    return copy


def bf16_capable() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def report(export_dir: Path) -> dict:
    return json.loads((export_dir / "report.json").read_text())


def test_fp32_ir_matches_pytorch_with_the_kept_sets_compared(fp32_export: Path) -> None:
    ov_report = report(fp32_export)["openvino"]
    checked = ov_report["validation"]
    assert checked["passed"] and checked["backend"] == "openvino" and checked["images"] == 450
    # The tie-aware rule ran on the tokens OpenVINO kept, not the margin fallback.
    assert checked["kept_sets_observed"] and all(layer["identical_fraction"] is not None for layer in checked["layers"])
    assert checked["accuracy"]["openvino"] == checked["accuracy"]["torch"]
    assert checked["max_abs_error"] < 1e-4
    assert ov_report["artifact"]["inference_precision"] == "fp32"


def test_manifest_records_the_ir_and_its_hashes(fp32_export: Path) -> None:
    record = read_export(fp32_export).artifacts["openvino"]
    assert record["file"] == IR_FILE and record["options"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert record["sha256"] == {name: file_sha256(fp32_export / name) for name in (IR_FILE, WEIGHTS_FILE)}
    # The IR has the graph's input and output, and keeps the fp32 weights (no fp16 compression).
    model = ov.Core().read_model(str(fp32_export / IR_FILE))
    assert [o.get_any_name() for o in model.outputs] == ["logits"]
    types = {str(n.get_element_type()) for n in model.get_ordered_ops() if n.get_type_name() == "Constant"}
    assert {t for t in types if "float" in t or "f16" in t} == {"<Type: 'float32'>"}


def _upstream_fake_quantize(node) -> list[str]:
    """FakeQuantize nodes reached from ``node``'s inputs without passing a product (or a ShapeOf:
    a shape carries no values)."""
    found, todo, seen = [], [i.get_source_output().get_node() for i in node.inputs()], set()
    while todo:
        n = todo.pop()
        if n.get_friendly_name() in seen:
            continue
        seen.add(n.get_friendly_name())
        if n.get_type_name() == "FakeQuantize":
            found.append(n.get_friendly_name())
        elif n.get_type_name() not in ("MatMul", "Convolution", "Parameter", "Constant", "ShapeOf"):
            todo.extend(i.get_source_output().get_node() for i in n.inputs())
    return found


def test_int8_ir_quantizes_weight_products_and_keeps_the_selection_float(int8_export: Path) -> None:
    model = ov.Core().read_model(str(int8_export / IR_FILE))
    ops = list(model.get_ordered_ops())
    products = [n for n in ops if n.get_type_name() == "MatMul"]
    # Weight MatMuls read an int8 weight (Constant i8 -> Convert) and a FakeQuantize'd activation.
    quantized = [
        n
        for n in products
        if any(
            p.get_type_name() == "Constant" and str(p.get_element_type()) == "<Type: 'int8_t'>"
            for i in n.inputs()
            for p in _chain(i.get_source_output().get_node())
        )
    ]
    assert len(quantized) >= 30, f"only {len(quantized)} MatMuls read int8 weights"
    # Every TopK's score path and every scoring q·kᵀ MatMul (both inputs) is free of FakeQuantize.
    on_path = [n for n in ops if n.get_friendly_name() in selection_path(model)]
    scoring_products = [n for n in on_path if n.get_type_name() == "MatMul"]
    assert len(scoring_products) == 3  # one q·kᵀ per pruning block
    for node in on_path:
        assert _upstream_fake_quantize(node) == [], f"{node.get_type_name()} {node.get_friendly_name()} reads a quantized tensor"
    assert selection_crossings(model) == []
    assert all(_upstream_fake_quantize(n) == [] for n in ops if n.get_type_name() in ("MVN", "Softmax"))


def _chain(node) -> list:
    """``node`` and what it reads through Convert / Subtract / Multiply / Reshape (a decompressed weight)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        if n.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
            todo.extend(i.get_source_output().get_node() for i in n.inputs())
    return out


def test_nncf_default_placement_quantizes_the_selection(fp32_export: Path) -> None:
    """Without colln's ignored scope NNCF puts FakeQuantize upstream of the TopKs: the check that
    passes colln's IR catches it."""
    model = convert(fp32_export / "model.onnx")
    images = validation_images("digits_vit", read_export(fp32_export).load_unpruned(), limit=16).images
    default = nncf.quantize(
        model, nncf.Dataset([images[i : i + 1] for i in range(16)]), model_type=nncf.ModelType.TRANSFORMER, subset_size=16
    )
    crossings = selection_crossings(default)
    assert crossings and any("MatMul" in c for c in crossings), crossings


def test_int8_accuracy_close_to_fp32(fp32_export: Path, int8_export: Path) -> None:
    fp32 = report(fp32_export)["openvino"]["validation"]["accuracy"]
    int8 = report(int8_export)["openvino"]["validation"]
    print(f"digits_vit keep 0.7: OpenVINO fp32 {fp32['openvino']:.4f}, int8 {int8['accuracy']['openvino']:.4f}; int8 verdict "
          f"{'passed' if int8['passed'] else 'FAILED: ' + '; '.join(int8['mismatches'])}")  # fmt: skip
    assert abs(int8["accuracy"]["openvino"] - fp32["openvino"]) <= 0.01
    assert report(int8_export)["openvino"]["artifact"]["precision"] == "int8"


def test_bf16_within_its_tolerance(fp32_export: Path) -> None:
    spec = read_export(fp32_export)
    unpruned = spec.load_unpruned()
    images = validation_images(spec.model, unpruned, limit=150)
    runner = openvino_runner(fp32_export, precision="bf16", record_kept=True)
    checked = validate(spec.apply(unpruned), unpruned, runner, images, "bf16", backend="openvino")
    assert checked.passed, checked.mismatches
    assert abs(checked.accuracy["openvino"] - checked.accuracy["torch"]) <= 0.01
    with openvino_runner(fp32_export, precision="bf16") as active:
        assert active.inference_precision == ("bf16" if bf16_capable() else "fp32")


def _products(xml: Path) -> int:
    """The IR's matrix products, by OpenVINO's own op types (an attention is one op)."""
    model = ov.Core().read_model(str(xml))
    return sum(n.get_type_name() in ("MatMul", "Convolution", "ScaledDotProductAttention") for n in model.get_ordered_ops())


def test_runtime_precisions_are_what_the_execution_graph_ran(fp32_export: Path, int8_export: Path) -> None:
    """The precision OpenVINO really ran, per matrix product, against what the hint and the IR
    fix: at the f32 hint every product of the fp32 IR runs f32, at bf16 (a CPU with BF16) every one
    bf16; the int8 IR runs its 8 blocks' qkv, proj, fc1 and fc2 in int8 (u8 or i8) and its
    attention in float. Each count covers every product of the IR (OpenVINO's op types)."""
    products = _products(fp32_export / IR_FILE)
    with openvino_runner(fp32_export, precision="fp32") as f32:
        assert f32.runtime_precisions == {"f32": products}
    record = read_export(fp32_export).artifacts["openvino"]
    assert record["runtime_precisions"] == report(fp32_export)["openvino"]["artifact"]["runtime_precisions"]
    assert record["runtime_precisions"] == {"f32": products}
    summary = "Matrix products by runtime precision (its execution graph): f32 " + str(products)
    assert summary in (fp32_export / "report.md").read_text()
    # The typed report reads it back (a key the schema does not know would be refused).
    assert ExportReport.from_dict(report(fp32_export)).to_dict() == report(fp32_export)

    int8_products = _products(int8_export / IR_FILE)
    with openvino_runner(int8_export, precision="int8") as int8:
        counts = int8.runtime_precisions
    assert read_export(int8_export).artifacts["openvino"]["runtime_precisions"] == counts
    assert sum(counts.values()) == int8_products == products
    assert counts.get("u8", 0) + counts.get("i8", 0) >= 4 * 8 and counts.get("f32", 0) > 0, counts
    assert set(counts) <= {"f32", "u8", "i8"}, counts
    if not bf16_capable():
        pytest.skip("this CPU has no BF16 (OpenVINO's OPTIMIZATION_CAPABILITIES): the bf16 hint runs fp32")
    with openvino_runner(fp32_export, precision="bf16") as bf16:
        assert bf16.runtime_precisions == {"bf16": products}
    with openvino_runner(int8_export, precision="int8-bf16") as int8_bf16:
        # What int8 left float runs bf16; the int8 products stay int8.
        assert int8_bf16.runtime_precisions == {
            "bf16": counts["f32"],
            **{p: n for p, n in counts.items() if p != "f32"},
        }


def test_int8_bf16_is_the_int8_ir_at_the_bf16_hint(int8_export: Path, int8_bf16_export: Path) -> None:
    record = read_export(int8_bf16_export).artifacts["openvino"]
    assert record["precision"] == "int8-bf16" and record["options"] == {"INFERENCE_PRECISION_HINT": "bf16"}
    # What OpenVINO really ran: bf16 where the CPU has it, fp32 (and the record says so) where not.
    assert record["inference_precision"] == ("bf16" if bf16_capable() else "fp32")
    # The same IR as the int8 export's (the hint is a compile option only): the same weights file,
    # byte for byte, and the same graph up to the node names OpenVINO numbers per process.
    int8_record = read_export(int8_export).artifacts["openvino"]
    assert record["sha256"][WEIGHTS_FILE] == int8_record["sha256"][WEIGHTS_FILE]
    graphs = [re.sub(r"_\d+\b", "_N", (d / IR_FILE).read_text()) for d in (int8_bf16_export, int8_export)]
    assert graphs[0] == graphs[1]
    assert int8_record["precision"] == "int8" and int8_record["options"] == {"INFERENCE_PRECISION_HINT": "f32"}


def test_openvino_precision_must_fit_the_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert export_main([*DIGITS, "--openvino", "--openvino-precision", "int8-bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--openvino-precision int8-bf16 does not go with --precision fp32" in err and not out.exists()
    argv = [*DIGITS, "--precision", "int8", "--openvino", "--openvino-precision", "bf16", "--out", str(out)]
    assert export_main(argv) == 2
    assert "int8 or int8-bf16 from an int8 export" in " ".join(capsys.readouterr().err.split()) and not out.exists()


def test_an_int8_ir_runs_at_either_hint_and_nothing_else(fp32_export: Path, int8_bf16_export: Path) -> None:
    for precision in ("fp32", "bf16"):
        with pytest.raises(UsageError, match=f"an OpenVINO int8 IR cannot run at {precision}: run it at int8 or int8-bf16"):
            openvino_runner(int8_bf16_export, precision=precision)
    with pytest.raises(UsageError, match="an OpenVINO fp32 IR cannot run at int8-bf16: run it at fp32 or bf16"):
        openvino_runner(fp32_export, precision="int8-bf16")
    with pytest.raises(UsageError, match="cannot run at fp16"):
        openvino_runner(int8_bf16_export, precision="fp16")
    images = validation_images("digits_vit", read_export(int8_bf16_export).load_unpruned(), limit=32).images
    # No precision: the recorded one (what colln-validate, colln-bench and colln-serve run).
    with open_runner(int8_bf16_export, "openvino") as default, openvino_runner(int8_bf16_export, precision="int8") as f32:
        assert (default.precision, f32.precision) == ("int8-bf16", "int8")
        assert str(f32.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
        assert f32.inference_precision == "fp32"
        assert default.inference_precision == ("bf16" if bf16_capable() else "fp32")
        ours, theirs = run(default, images), run(f32, images)
    # The float parts really ran at another precision where the CPU has bf16 (the same numbers where not).
    assert (np.abs(ours - theirs).max() > 0) == bf16_capable()


def test_int8_bf16_validation_on_digits(int8_export: Path, int8_bf16_export: Path) -> None:
    """colln-validate's path: the IR at its recorded precision, judged by the int8 rule, on the 450
    test images as colln-export validates it (on the first 150, 73 are judged: fewer than half);
    beside it the same IR at the f32 hint on the same images, and int8's verdict from the int8
    export's report."""
    spec = read_export(int8_bf16_export)
    unpruned = spec.load_unpruned()
    checked = validate_export(int8_bf16_export, "openvino", pruned=spec.apply(unpruned), unpruned=unpruned)
    tol = TOLERANCES["int8-bf16"]
    assert checked.precision == "int8-bf16" and checked.tolerances == tol == TOLERANCES["int8"]
    assert checked.passed, checked.mismatches
    assert checked.kept_sets_observed and checked.judged_images > 0
    # The accuracy gate holds: NNCF's int8 with its float parts at bf16 loses no accuracy.
    assert checked.accuracy["torch"] - checked.accuracy["openvino"] <= tol.max_accuracy_drop
    assert not [m for m in checked.mismatches if m.startswith("accuracy")]
    images = validation_images(spec.model, unpruned)
    with openvino_runner(int8_bf16_export, precision="int8") as f32:
        at_f32 = float((run(f32, images.images).argmax(1) == images.labels).mean())
    int8 = report(int8_export)["openvino"]["validation"]
    print(f"digits_vit keep 0.7, OpenVINO int8-bf16 on 450 images: accuracy {checked.accuracy['openvino']:.4f} (torch "
          f"{checked.accuracy['torch']:.4f}, int8 at the f32 hint {at_f32:.4f}), judged {checked.judged_images}, min cosine "
          f"judged {checked.min_cosine_judged:.4f}, max |err| judged {checked.max_abs_error_judged:.3f}: "
          f"{'passed' if checked.passed else 'FAILED: ' + '; '.join(checked.mismatches)}; int8 (f32 hint) on 450 images: "
          f"{'passed' if int8['passed'] else 'FAILED: ' + '; '.join(int8['mismatches'])}")  # fmt: skip
    # The two hints of one IR classify alike (they differ only in the float parts' rounding).
    assert abs(checked.accuracy["openvino"] - at_f32) <= 0.01


def test_tampered_ir_is_refused_everywhere(fp32_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = shutil.copytree(fp32_export, tmp_path / "copy")
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match=r"does not match export\.json"):
        open_runner(copy, "openvino")
    with pytest.raises(ExportDirError, match=r"does not match export\.json"):
        write_model_repository(copy, tmp_path / "repo", backend="openvino")
    assert validate_main([str(copy), "--backend", "openvino"]) == 2
    assert "model.bin does not match export.json" in capsys.readouterr().err
    (copy / IR_FILE).unlink()
    with pytest.raises(ExportDirError, match="missing"):
        open_runner(copy, "openvino")


def test_missing_extra_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name.split(".")[0] in ("openvino", "nncf"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    out = tmp_path / "never"
    assert export_main([*DIGITS, "--no-validate", "--openvino", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["colln: error: backend: OpenVINO is not installed: pip install 'colln[openvino]'"]
    assert not out.exists()


def test_calibration_sets_that_cannot_calibrate(fp32_export: Path) -> None:
    model = convert(fp32_export / "model.onnx")
    with pytest.raises(CalibrationError, match="empty"):
        quantize(model, np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError, match=r"\(3, 64, 64\) but the model takes \(3, 32, 32\)"):
        quantize(model, np.zeros((4, 3, 64, 64), np.float32))


def test_int8_accuracy_collapse_fails_validation_with_numbers(
    fp32_export: Path, int8_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = shutil.copytree(int8_export, tmp_path / "collapse")
    spec = read_export(copy)
    images = validation_images(spec.model, spec.load_unpruned(), limit=16).images
    # Calibrated on images 1000x too bright: every activation range is 1000x too wide.
    write_ir(copy, "int8", images * 1000.0, source=fp32_export / "model.onnx")
    assert validate_main([str(copy), "--backend", "openvino", "--val-limit", "200"]) == 1
    captured = capsys.readouterr()
    assert "colln: error: validate: openvino disagrees with torch" in captured.err
    lost = re.search(r"mismatch: accuracy (0\.\d+) vs torch (0\.\d+): ([\d.]+) points lost", " ".join(captured.err.split()))
    assert lost is not None and float(lost[3]) > 1.0 and float(lost[1]) < float(lost[2])


def test_a_graph_openvino_cannot_run_is_one_line_naming_the_op(fp32_export: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Bogus", ["x"], ["y"], domain="com.acme", name="my_bogus")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "bogus.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.acme", 1)]), path)
    with pytest.raises(ExportError) as caught:
        convert(path)
    assert "com.acme.Bogus" in str(caught.value) and "\n" not in str(caught.value)
    # What compiles gets the threads asked for.
    compiled = compile_model(fp32_export / IR_FILE, "fp32", threads=1)
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1


def test_triton_openvino_entry_matches_the_schema(fp32_export: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(fp32_export, tmp_path / "repo", backend="openvino", max_batch=8)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "openvino" and not config.platform and config.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in config.input] == [("images", [3, 32, 32])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [10])]
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    for name in ("model.xml", "model.bin"):
        assert (model_dir / "1" / name).read_bytes() == (fp32_export / "openvino" / name).read_bytes()


def test_stack_times_both_runtimes_on_the_listed_files(fp32_export: Path, tmp_path: Path, monkeypatch) -> None:
    from colln.export import openvino

    compiled = []
    monkeypatch.setattr(openvino, "compile_model", lambda *a, **k: compiled.append(a[1]) or compile_model(*a, **k))
    timing, runtimes = Timing(rounds=3, warmup=1, threads=1), ("onnxruntime", "openvino")
    result = bench_export(fp32_export, batches=(2,), timing=timing, cache=tmp_path / "cache", runtimes=runtimes)
    # Each OpenVINO variant compiled once (its runtime precisions come from the runner that was
    # timed), besides the unpruned IR's one compile when it is written into the new cache.
    assert sorted(compiled) == ["bf16", "bf16", "fp32", "fp32", "fp32"], compiled
    stack = result["stack"]
    expected = ["unpruned-fp32", "pruned-fp32", "openvino:unpruned-fp32", "openvino:pruned-fp32"]
    assert stack["variants"] == [*expected, "openvino:unpruned-bf16", "openvino:pruned-bf16"]
    rows = stack["batches"]["2"]
    # Paired speedups: the baseline over itself is exactly 1, and each variant over its own unpruned.
    assert rows["unpruned-fp32"]["speedup"] == 1.0 and rows["openvino:unpruned-bf16"]["speedup_same_runtime"] == 1.0
    for name, artifact in stack["artifacts"].items():
        assert Path(artifact["artifact"]).is_file(), name
        if name.startswith("openvino:"):
            assert artifact["artifact"].endswith(IR_FILE)
            assert artifact["options"]["INFERENCE_PRECISION_HINT"] == ("bf16" if "bf16" in name else "f32")
    assert stack["artifacts"]["openvino:pruned-fp32"]["artifact"] == str(fp32_export / IR_FILE)
    # What each OpenVINO variant's execution graph ran: every product at its hint's precision.
    products = _products(fp32_export / IR_FILE)
    assert stack["artifacts"]["openvino:pruned-fp32"]["runtime_precisions"] == {"f32": products}
    assert stack["artifacts"]["openvino:pruned-bf16"]["runtime_precisions"] == {("bf16" if bf16_capable() else "f32"): products}
    assert "runtime_precisions" not in stack["artifacts"]["pruned-fp32"]
    assert Stack.from_dict(stack).to_dict() == stack
    # ONNX Runtime's figures come from the listed model.ort.onnx, with no fusion left to do at load.
    assert stack["artifacts"]["pruned-fp32"]["artifact"] == str(fp32_export / "model.ort.onnx")
    assert "fusion at load" not in stack["artifacts"]["unpruned-fp32"]["options"]


def test_int8_stack_times_the_int8_ir_at_both_hints(
    fp32_export: Path, int8_export: Path, int8_bf16_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenVINO half of an int8 stack: the cached unpruned int8 IR and the export's own, each
    at int8 and int8-bf16. The cached counterparts are stood in for by the fixtures (fp32_export:
    an fp32 export with its IR; int8_export: an int8 one) rather than exported again."""
    stand_ins = {"fp32": fp32_export, "int8": int8_export}
    monkeypatch.setattr(bench, "unpruned_export", lambda spec, *_, **__: stand_ins[spec.precision])
    monkeypatch.setattr(bench, "cached_export", lambda spec, *_, **__: stand_ins[spec.precision])
    variants = stack_exports(
        read_export(int8_bf16_export), int8_bf16_export, Path("unused"), runtimes=("onnxruntime", "openvino")
    )
    ov_names = [n for n in variants if n.startswith("openvino:")]
    assert ov_names == [f"openvino:{kind}-{p}" for p in ("fp32", "bf16", "int8", "int8-bf16") for kind in ("unpruned", "pruned")]
    assert variants["openvino:pruned-int8-bf16"] == Variant(int8_bf16_export, "openvino", "int8-bf16")
    assert variants["openvino:unpruned-int8-bf16"] == Variant(int8_export, "openvino", "int8-bf16")
    assert variants["openvino:pruned-int8"] == Variant(int8_bf16_export, "openvino", "int8")
    for name in ov_names:
        described = variants[name].describe()
        assert described["artifact"] == str(variants[name].directory / IR_FILE)
        assert described["options"]["INFERENCE_PRECISION_HINT"] == ("bf16" if name.endswith("bf16") else "f32"), name
    # colln-bench --backend openvino: the unpruned IR runs at the export's recorded hint too (what
    # would be timed is caught on its way in; the runners' hints are checked above).
    timed = {}

    class Caught(Exception):
        pass

    def catch(exports, *_, **__):
        timed.update(exports)
        raise Caught

    monkeypatch.setattr(bench, "measure_exports", catch)
    with pytest.raises(Caught):
        bench_export(int8_bf16_export, backend="openvino", batches=(1,), cache=Path("unused"))
    assert timed == {
        "unpruned": Variant(int8_export, "openvino", "int8-bf16"),
        "pruned": Variant(int8_bf16_export, "openvino", "int8-bf16"),
    }


def test_colln_serve_answers_on_openvino(fp32_export: Path, tmp_path: Path) -> None:
    """colln-serve --backend openvino: the python-backend model runs the IR behind the guard; its
    logits are OpenVINO's own on the same images."""
    httpclient = pytest.importorskip("tritonclient.http")
    pytest.importorskip("pytriton")
    from serving_helpers import HOST, digit_images, free_ports, launch, stop, wait_ready

    http, grpc, metrics = free_ports(3)
    argv = [
        str(Path(sys.executable).with_name("colln-serve")), str(fp32_export), "--backend", "openvino",
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "8",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    proc = launch(argv, log)
    try:
        wait_ready(proc, f"{HOST}:{http}")
        images = digit_images(8)
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        served = httpclient.InferenceServerClient(f"{HOST}:{http}").infer(fp32_export.name, [tensor]).as_numpy("logits")
    except Exception:  # noqa: BLE001 - whatever went wrong, show the server's log
        pytest.fail(f"colln-serve --backend openvino failed:\n{log.read_text()[-3000:]}")
    finally:
        stop(proc)
    with open_runner(fp32_export, "openvino") as runner:
        np.testing.assert_allclose(served, runner.infer({"images": images})["logits"], rtol=1e-4, atol=1e-5)


def test_listed_onnxruntime_artifact_is_what_a_plain_session_runs(fp32_export: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from serving_helpers import digit_images

    artifacts = read_export(fp32_export).artifacts
    assert artifacts["onnx"] == {"file": "model.onnx"}
    assert artifacts["onnxruntime"]["file"] == "model.ort.onnx"
    assert artifacts["onnxruntime"]["options"] == {"session.force_spinning_stop": "1"}
    # The attention fusion colln does for ONNX Runtime is in the file, not done at load.
    ops = [n.op_type for n in onnx.load(str(fp32_export / "model.ort.onnx")).graph.node]
    assert "MultiHeadAttention" in ops and "MultiHeadAttention" not in [
        n.op_type for n in onnx.load(str(fp32_export / "model.onnx")).graph.node
    ]
    images = digit_images(8)
    plain = ort.InferenceSession(str(fp32_export / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    with open_runner(fp32_export, "onnxruntime", threads=2) as runner:
        ours = runner.infer({"images": images})["logits"]
    np.testing.assert_allclose(plain.run(["logits"], {"images": images})[0], ours, rtol=1e-5, atol=1e-6)
    copy = shutil.copytree(fp32_export, tmp_path / "copy", ignore=shutil.ignore_patterns("openvino"))
    fused = (copy / "model.ort.onnx").read_bytes()
    (copy / "model.ort.onnx").write_bytes((copy / "model.onnx").read_bytes())
    with pytest.raises(ExportDirError, match=r"model\.ort\.onnx is missing or does not match export\.json"):
        open_runner(copy, "onnxruntime")
    # A model.onnx re-saved behind colln's back (same plan metadata) no longer matches the fused file.
    (copy / "model.ort.onnx").write_bytes(fused)
    proto = onnx.load(str(copy / "model.onnx"))
    proto.producer_version = "edited"
    onnx.save(proto, str(copy / "model.onnx"))
    with pytest.raises(ExportDirError, match=r"model\.onnx changed since model\.ort\.onnx was made from it"):
        open_runner(copy, "onnxruntime")


def test_tokens_export_gets_an_ir_that_matches_pytorch(tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    argv = ["digits_vit", "--keep", "0.7", "--output", "tokens", "--openvino", "--no-latency", "--val-limit", "40"]
    assert export_main([*argv, "--out", str(out)]) == 0
    checked = report(out)["openvino"]["validation"]
    assert checked["passed"] and checked["output"] == "tokens" and checked["judged_images"] == 40
    with open_runner(out, "openvino") as runner:
        outputs = runner.infer({"images": validation_images("digits_vit", read_export(out).load_unpruned(), limit=2).images})
    assert list(outputs) == ["tokens", "indices"] and outputs["tokens"].shape[:2] == outputs["indices"].shape == (2, 45)


def test_validation_judges_the_ir_as_deployed(fp32_export: Path, tmp_path: Path) -> None:
    """At the bf16 hint the IR with the TopK outputs added compiles to another graph (digits_vit:
    image 83 classified differently): the verdict and accuracy are of the IR as deployed, here
    against a plain OpenVINO compile of the same file at the same hint."""
    if not bf16_capable():
        pytest.skip("the bf16 hint runs fp32 on this CPU: both compiles are the same graph")
    copy = shutil.copytree(fp32_export, tmp_path / "bf16")
    write_ir(copy, "bf16")
    spec = read_export(copy)
    unpruned = spec.load_unpruned()
    images = validation_images(spec.model, unpruned, limit=100)
    checked = validate_export(copy, "openvino", pruned=spec.apply(unpruned), unpruned=unpruned, limit=100)
    plain = ov.Core().compile_model(str(copy / IR_FILE), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    logits = np.concatenate([plain({0: images.images[i : i + 32]})[0] for i in range(0, 100, 32)])
    assert checked.precision == "bf16" and checked.kept_sets_observed
    assert checked.accuracy["openvino"] == float((logits.argmax(1) == images.labels).mean())


@pytest.mark.parametrize("merging", [["--tome", "8"], ["--keep", "0.7", "--merge"]], ids=["tome", "merge"])
def test_merged_exports_refuse_the_bf16_hint(tmp_path: Path, capsys: pytest.CaptureFixture, merging: list[str]) -> None:
    """bf16 rounding flips near-tied merge choices (digits_vit --tome 8: every image near-tied, none
    judgeable): refused up front like --precision fp16/int8 with merging."""
    out = tmp_path / "never"
    argv = ["digits_vit", *merging, "--openvino", "--openvino-precision", "bf16", "--no-latency", "--out", str(out)]
    assert export_main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    what = "--tome" if merging[0] == "--tome" else "--merge"
    assert f"{what} needs --openvino-precision fp32: at bf16, rounding flips" in err and not out.exists()


def _edit_manifest(export_dir: Path, **fields) -> None:
    spec = read_export(export_dir)
    spec = replace(spec, artifacts={**spec.artifacts, "openvino": {**spec.artifacts["openvino"], **fields}})
    spec.write(export_dir)


def test_every_manifest_field_is_checked_against_its_file(
    fp32_export: Path, int8_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A hand-edited export.json is refused (exit 2, one line) wherever the IR is opened: an unknown
    precision, one that does not fit the IR, a file outside the export, an IR swapped in with its
    hashes re-recorded."""
    cases = {
        "fp64": ({"precision": "fp64"}, "artifacts.openvino.precision is 'fp64', not one of fp32, bf16, int8, int8-bf16"),
        "int8": ({"precision": "int8"}, "artifacts.openvino.precision int8 runs an int8 IR, but this is a fp32 export"),
        # Another export's IR, by a relative path from this one (colln-bench timed it as this export's).
        "elsewhere": ({"file": os.path.relpath(int8_export / IR_FILE, tmp_path / "elsewhere")}, "points outside"),
        "absolute": ({"file": str(fp32_export / IR_FILE)}, "not a file inside the export"),
        "unhashed": ({"sha256": {IR_FILE: file_sha256(fp32_export / IR_FILE)}}, "sha256 has no hash of openvino/model.bin"),
        "hint": ({"options": {"INFERENCE_PRECISION_HINT": "bf16"}}, "options are not precision fp32's"),
    }
    for name, (fields, expected) in cases.items():
        copy = shutil.copytree(fp32_export, tmp_path / name, ignore=shutil.ignore_patterns(".colln-cache"))
        _edit_manifest(copy, **fields)
        with pytest.raises(ExportDirError, match=re.escape(expected)):
            open_runner(copy, "openvino")
        with pytest.raises(ExportDirError, match=re.escape(expected)):
            write_model_repository(copy, tmp_path / f"repo-{name}", backend="openvino")
        assert validate_main([str(copy), "--backend", "openvino", "--val-limit", "8"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("colln: error: export-dir:") and expected in " ".join(err.split()) and "Traceback" not in err
    # An int8 export's IR replaced by an fp32 one, the manifest re-hashed to it: the IR itself says fp32.
    swapped = shutil.copytree(int8_export, tmp_path / "swapped", ignore=shutil.ignore_patterns(".colln-cache"))
    for name in (IR_FILE, WEIGHTS_FILE):
        shutil.copyfile(fp32_export / name, swapped / name)
    _edit_manifest(swapped, sha256={name: file_sha256(swapped / name) for name in (IR_FILE, WEIGHTS_FILE)})
    with pytest.raises(ExportDirError, match=r"model\.xml is an fp32 IR but export\.json records precision int8"):
        open_runner(swapped, "openvino")


def test_bench_on_openvino_alone_pairs_openvinos_own_variants(fp32_export: Path, tmp_path: Path, capsys) -> None:
    """``--runtimes openvino``: the stack keeps ONNX Runtime's unpruned fp32 as its common baseline,
    and the rows pair OpenVINO's pruned against OpenVINO's unpruned (no ONNX Runtime pruned variant
    to pair); a runtime listed twice is refused in one line, before anything is exported."""
    from colln.app.bench_cli import main as bench_main

    out = tmp_path / "r.json"
    argv = [str(fp32_export), "--batch", "2", "--rounds", "3", "--warmup", "1", "--threads", "1", "--cache", str(tmp_path)]
    assert bench_main([*argv, "--runtimes", "openvino", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["case"].endswith("@openvino-t1")
    row, stack = result["batches"]["2"], result["stack"]["batches"]["2"]
    assert stack["unpruned-fp32"]["speedup"] == 1.0 and "pruned-fp32" not in stack
    ratios = ("speedup", "speedup_iqr", "speedup_same_runtime", "speedup_same_runtime_iqr")
    for kind in ("unpruned", "pruned"):
        assert row[kind] == {k: v for k, v in stack[f"openvino:{kind}-fp32"].items() if k not in ratios}
    pruned = stack["openvino:pruned-fp32"]
    assert (row["speedup"], row["speedup_iqr"]) == (pruned["speedup_same_runtime"], pruned["speedup_same_runtime_iqr"])
    capsys.readouterr()
    for runtimes in ("openvino,openvino", "onnxruntime,openvino,onnxruntime"):
        assert bench_main([*argv, "--runtimes", runtimes, "--cache", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("colln: error: arguments: runtimes are listed once each") and "listed twice" in err, err
    assert not (tmp_path / "never").exists()


def test_a_full_disk_while_writing_the_ir_is_one_line_saying_what_to_do(
    fp32_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """OpenVINO's writer fails with a C++ stream error and no errno (``basic_ios::clear: iostream
    error``, as on a real full tmpfs): exit 2 saying the disk is full where it is, else what to
    check; never an internal error."""
    import shutil as shutil_module

    from colln.app.cli import ArgumentParser, run_main

    copy = shutil.copytree(fp32_export, tmp_path / "copy")

    def full(model: object, path: str, compress_to_fp16: bool = True) -> None:
        Path(path).write_bytes(b"<?xml")  # what was written before the disk filled up
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", full)
    real_usage = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real_usage(path)._replace(free=4096))
    assert run_main(lambda args: write_ir(copy, "fp32"), ArgumentParser(prog="colln-test"), []) == 2
    assert capsys.readouterr().err.strip() == (
        f"colln: error: output: cannot write {copy / 'openvino'} (the disk is full): free some space and run it again"
    )
    monkeypatch.setattr(shutil_module, "disk_usage", real_usage)  # room left: not a full disk, say what to check
    assert run_main(lambda args: write_ir(copy, "fp32"), ArgumentParser(prog="colln-test"), []) == 2
    assert capsys.readouterr().err.strip() == (
        f"colln: error: openvino: OpenVINO could not write its IR to {copy / 'openvino'} (basic_ios::clear: iostream "
        "error): check that the disk has room and the directory is writable, or choose another --out"
    )


def test_int8_ir_passes_the_int8_rule_with_accuracy_control_recorded(int8_export: Path) -> None:
    """colln-export digits_vit --keep 0.7 --precision int8 --openvino exits 0 (the fixture): judged
    by the int8 rule on 450 images, NNCF's accuracy control on the labelled digits recorded, nothing
    reverted to float (int8 loses no accuracy there)."""
    ov_report = report(int8_export)["openvino"]
    checked, record = ov_report["validation"], ov_report["artifact"]
    assert checked["passed"] and checked["images"] == 450 and checked["precision"] == "int8", checked["mismatches"]
    assert record["accuracy_control"] == {
        "method": "nncf.quantize_with_accuracy_control",
        "metric": "top-1",
        "images": 450,
        "max_drop": 0.005,
    }
    assert record["float_products"] == []
    assert read_export(int8_export).artifacts["openvino"] == record
    # The weight products are int8 in the IR itself (OpenVINO's own reading of it).
    model = ov.Core().read_model(str(int8_export / IR_FILE))
    fq = {n.get_friendly_name() for n in model.get_ordered_ops() if n.get_type_name() == "FakeQuantize"}
    assert len(fq) >= 8 * 4 + 1
    tol = TOLERANCES["int8"]
    assert checked["accuracy"]["torch"] - checked["accuracy"]["openvino"] <= tol.max_accuracy_drop
    assert all(layer["mean_overlap_all"] >= tol.min_mean_overlap for layer in checked["layers"])


def _swap_fc1(proto) -> None:
    """The first and last blocks' fc1 weights swapped (fp32 graph)."""
    fc1 = [t for t in proto.graph.initializer if tuple(t.dims) == (64, 256)]
    first, last = bytes(fc1[0].raw_data), bytes(fc1[-1].raw_data)
    assert first and last and first != last
    fc1[0].raw_data, fc1[-1].raw_data = last, first


@pytest.mark.parametrize("damage", ["selection quantized", "swapped weights", "another plan"])
def test_a_wrong_int8_ir_fails_the_int8_rule(
    fp32_export: Path, int8_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    """The int8 rule still fails what is wrong, each IR written into the int8 export as colln-export
    writes one (manifest re-hashed, the ONNX graph untouched): NNCF's default placement (the selection
    quantized), swapped fc1 weights, the IR of the keep 0.5 plan (another K at every layer). An ONNX
    graph with a wrong K is refused before validation (tests/test_int8.py); its IR does not run (the
    reshapes after the TopK hold the plan's K)."""
    import onnx

    copy = shutil.copytree(int8_export, tmp_path / "copy", ignore=shutil.ignore_patterns(".colln-cache"))
    images = validation_images("digits_vit", read_export(copy).load_unpruned(), limit=32).images
    source = fp32_export / "model.onnx"
    if damage == "swapped weights":
        proto = onnx.load(str(source))
        _swap_fc1(proto)
        source = tmp_path / "damaged.onnx"
        onnx.save(proto, str(source))
    elif damage == "another plan":
        other = tmp_path / "keep0.5"
        argv = ["digits_vit", "--keep", "0.5", "--weights", "bundled", "--no-latency", "--no-validate", "--out", str(other)]
        assert export_main(argv) == 0
        source = other / "model.onnx"
    if damage != "selection quantized":
        write_ir(copy, "int8", images, source=source)
    else:  # the copy's own int8 IR (of this plan) replaced by NNCF's default placement
        default = nncf.quantize(
            convert(source), nncf.Dataset([images[i : i + 1] for i in range(32)]), model_type=nncf.ModelType.TRANSFORMER
        )
        ov.save_model(default, str(copy / IR_FILE), compress_to_fp16=False)
        _edit_manifest(copy, sha256={name: file_sha256(copy / name) for name in (IR_FILE, WEIGHTS_FILE)})
    out = tmp_path / "v.json"
    assert validate_main([str(copy), "--backend", "openvino", "--val-limit", "150", "--json", str(out)]) == 1
    assert "colln: error: validate: openvino " in capsys.readouterr().err
    mismatches = json.loads(out.read_text())["mismatches"]
    expected = {
        "selection quantized": r"the int8 graph quantizes the token selection: .* feeds",
        "swapped weights": r"top-1 agreement with torch 0\.[0-8]",
        "another plan": r"layer \d: mean kept-set overlap with torch 0\.[0-9]+, below 0\.95",
    }[damage]
    assert any(re.match(expected, m) for m in mismatches), mismatches


def test_accuracy_control_reverts_products_to_float_and_records_them(
    fp32_export: Path, int8_export: Path, tmp_path: Path
) -> None:
    """NNCF's accuracy control (colln-export --max-accuracy-drop) when int8 loses more than the
    drop allowed: the labels are OpenVINO fp32's own top-1 on images where plain int8 (the same
    recipe, calibration and validation-free) disagrees with it and a few where it agrees, so fp32
    scores 100% and int8 less; with no drop allowed NNCF must revert products to float until int8
    agrees. What stayed float is recorded, and the IR's execution graph runs more float products
    than the plain int8 IR's."""
    copy = shutil.copytree(int8_export, tmp_path / "copy", ignore=shutil.ignore_patterns(".colln-cache"))
    images = validation_images("digits_vit", read_export(copy).load_unpruned()).images
    calibration, source = images[:32], fp32_export / "model.onnx"
    fp32 = compile_model(convert(source), "fp32")
    plain = quantize(convert(source), calibration)
    int8 = compile_model(plain, "int8")
    predicted = {name: np.asarray(m(images)[0]).argmax(-1) for name, m in (("fp32", fp32), ("int8", int8))}
    differ = np.flatnonzero(predicted["fp32"] != predicted["int8"])
    assert differ.size, "plain int8 agrees with fp32 on every digit: nothing for accuracy control to restore"
    subset = np.concatenate([differ[:4], np.flatnonzero(predicted["fp32"] == predicted["int8"])[:12]])
    write_ir(
        copy, "int8", calibration, source=source, validation=(images[subset], predicted["fp32"][subset]), max_accuracy_drop=0.0
    )
    record = read_export(copy).artifacts["openvino"]
    assert record["accuracy_control"] == {
        "method": "nncf.quantize_with_accuracy_control",
        "metric": "top-1",
        "images": len(subset),
        "max_drop": 0.0,
    }
    # Reverted: weight products (the patch embedding, qkv, proj, fc1, fc2, the head) left float,
    # named in the record as the IR's own products.
    assert record["float_products"], record
    reverted = ov.Core().read_model(str(copy / IR_FILE))
    weight_products = {
        n.get_friendly_name() for n in reverted.get_ordered_ops() if n.get_type_name() in ("MatMul", "Convolution")
    }
    assert set(record["float_products"]) <= weight_products
    # The execution graph runs them float: more f32 products than the plain int8 IR, as many in all.
    from colln.export.openvino import runtime_precisions

    before, after = runtime_precisions(int8, plain), record["runtime_precisions"]
    assert sum(after.values()) == sum(before.values())
    assert after.get("f32", 0) > before.get("f32", 0), (before, after)
    # And the drop is restored: the reverted IR agrees with fp32 on the subset.
    restored = compile_model(reverted, "int8")
    assert np.array_equal(np.asarray(restored(images[subset])[0]).argmax(-1), predicted["fp32"][subset])

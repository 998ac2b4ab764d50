"""colln-export end to end on digits_vit: the export directory, the ONNX contract (names, dynamic
batch, constant K, metadata), ONNX Runtime vs PyTorch at several batch sizes, keep 1.0 == the
unpruned model, the report, and every bad input exiting 2 without leaving anything behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from speed_checks import assert_latency_stats, assert_plausible_speedup

from colln.app.export_cli import main
from colln.data import preprocess
from colln.export.onnx import read_metadata, topk_constants
from colln.export.spec import ExportSpec, file_sha256
from colln.infer.environment import cpu_flags, cpu_model, describe_cpu_flags
from colln.infer.timing import Timing
from colln.models import bundled

REPORT_KEYS = {"schema", "created", "model", "export", "plan", "flops", "validation", "latency", "versions", "environment"}


def _digit_batch(count: int) -> np.ndarray:
    split = bundled.load_split("test")
    return preprocess(split.images[:count], bundled.create_model()).numpy()


def test_export_dir_and_onnx_contract(digits_export: Path) -> None:
    files = {p.name for p in digits_export.iterdir()}
    assert files == {"model.onnx", "model.ort.onnx", "export.json", "report.json", "report.md"}
    proto = onnx.load(str(digits_export / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("images", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT == out.type.tensor_type.elem_type
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    # digits_vit: 64 patches + CLS, 8 blocks -> EViT's quarter points 2, 4, 6; k = ceil(0.7 * candidates).
    assert topk_constants(proto) == [45, 32, 23]
    plan = json.loads(read_metadata(digits_export / "model.onnx")["colln.plan"])
    assert plan == ExportSpec.read(digits_export).plan_record
    assert plan["layers"] == [2, 4, 6] and plan["keep_counts"] == [45, 32, 23]
    # The artifact manifest is written after the graph: a fresh export opens (read_export compares
    # every graph-determined field, and the manifest is not one of them).
    from colln.export.artifact import read_export

    assert set(read_export(digits_export).artifacts) == {"onnx", "onnxruntime"}


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnxruntime_matches_torch_at_batch_sizes(digits_export: Path, batch: int) -> None:
    x = _digit_batch(batch)
    logits = ort.InferenceSession(str(digits_export / "model.onnx")).run(None, {"images": x})[0]
    with torch.no_grad():
        ref = ExportSpec.read(digits_export).load_pruned()(torch.from_numpy(x)).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_report_json(digits_export: Path) -> None:
    report = json.loads((digits_export / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    v = report["validation"]
    assert v["passed"] and v["backend"] == "onnxruntime" and v["images"] == len(bundled.load_split("test").labels)
    assert v["kept_sets_observed"] and [layer["k"] for layer in v["layers"]] == [45, 32, 23]
    assert v["top1_agreement_judged"] == 1.0 and v["min_cosine_judged"] >= 0.9999
    f = report["flops"]
    assert f["bound"] == pytest.approx(f["full"] / f["pruned"]) and f["bound"] > 1.3
    lat = report["latency"]
    assert set(lat["batches"]) == {"1", "4"} and lat["flops_bound"] == f["bound"]
    # --latency-rounds 5 (the older name of --rounds) and the defaults of the rest, as colln-bench records them.
    assert lat["timing"] == Timing(rounds=5).to_dict() and lat["timing"]["warmup"] == Timing.warmup
    assert (lat["threads"], lat["warmup"]) == ("backend default", Timing.warmup)
    assert "rounds 5, warm-up 5, threads runtime default" in (digits_export / "report.md").read_text()
    for batch, entry in lat["batches"].items():
        assert_latency_stats(entry["pruned"], batch=int(batch), rounds=5)
        assert_latency_stats(entry["unpruned"], batch=int(batch), rounds=5)
        assert_plausible_speedup(entry, lat["flops_bound"])
    assert {"torch", "timm", "onnx", "onnxruntime"} <= set(report["versions"])
    assert "## Validation: passed" in (digits_export / "report.md").read_text()
    # The CPU features the figures depend on, beside the CPU's name.
    env = report["environment"]
    assert env["cpu_flags"] == cpu_flags() and env["cpu"] == cpu_model()
    assert (
        f"({env['cpu']}, {describe_cpu_flags(env['cpu_flags'])}, {env['cpus']} cpus)" in (digits_export / "report.md").read_text()
    )


def test_keep_one_is_the_unpruned_model(tmp_path: Path, digits_weights: str) -> None:
    out = tmp_path / "keep1"
    assert main(["digits_vit", "--keep", "1.0", "--weights", digits_weights, "--out", str(out), "--no-latency"]) == 0
    proto = onnx.load(str(out / "model.onnx"))
    assert topk_constants(proto) == []
    x = _digit_batch(4)
    with torch.no_grad():
        ref = ExportSpec.read(out).load_unpruned()(torch.from_numpy(x)).numpy()
    logits = ort.InferenceSession(proto.SerializeToString()).run(None, {"images": x})[0]
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["bound"] == 1.0 and report["validation"]["unpruned_top1_agreement"]["torch"] == 1.0


def test_prints_a_table(digits_export: Path, digits_weights: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x"
    argv = ["digits_vit", "--keep", "0.5", "--layers", "1,3", "--weights", digits_weights, "--out", str(out), "--no-validate"]
    assert main([*argv, "--latency-batches", "2", "--latency-rounds", "3"]) == 0
    text = capsys.readouterr().out
    assert "colln-export digits_vit" in text and "TopK K" in text and "latency b=2" in text
    # keep 0.5 at blocks 1 and 3: 64 -> 32 -> 16 candidates.
    assert topk_constants(onnx.load(str(out / "model.onnx"))) == [32, 16]
    assert json.loads((out / "report.json").read_text())["validation"] is None


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_weights")
    (root / "corrupt.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    save_file({"foo.weight": torch.zeros(3, 3)}, str(root / "other.safetensors"))
    (root / "a_file").write_text("x")
    return {"corrupt": str(root / "corrupt.safetensors"), "other": str(root / "other.safetensors"), "file": str(root / "a_file")}


BAD_INPUTS = {
    "unknown model": (["vit_bsae"], "did you mean vit_base"),
    "keep zero": (["digits_vit", "--keep", "0"], "outside (0, 1]"),
    "keep above one": (["digits_vit", "--keep", "1.5"], "outside (0, 1]"),
    "keep not a number": (["digits_vit", "--keep", "most"], "--keep must be a number"),
    "layer out of range": (["digits_vit", "--layers", "2,8"], "blocks 0..7"),
    "layers malformed": (["digits_vit", "--layers", "2,x"], "comma-separated integers"),
    "layers not increasing": (["digits_vit", "--layers", "4,2"], "strictly increasing"),
    "unknown metric": (["digits_vit", "--metric", "entropy"], "invalid choice"),
    "image size not a multiple of the patch": (["digits_vit", "--img-size", "30"], "multiple of the patch size"),
    "image size zero": (["digits_vit", "--img-size", "0"], "positive integer"),
    "image size not a number": (["digits_vit", "--img-size", "big"], "invalid int value"),
    "weights missing": (["digits_vit", "--weights", "/nonexistent/w.safetensors"], "does not exist"),
    "weights corrupt": (["digits_vit", "--weights", "{corrupt}"], "is it corrupt"),
    "weights mismatched": (["digits_vit", "--weights", "{other}"], "does not match the model"),
    "digits pretrained": (["digits_vit", "--weights", "pretrained"], "no hub weights"),
    "unwritable out": (["digits_vit", "--weights", "random", "--out", "{file}/out"], "cannot write"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_cleanly(case: str, bad_weights: dict[str, str], tmp_path: Path, capsys) -> None:
    argv, expected = BAD_INPUTS[case]
    argv = [a.format(**bad_weights) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if "--weights" not in argv:
        argv += ["--weights", "random"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # At most the finished progress steps, then the error line.
    assert err[-1].startswith("colln: error: ") and expected in err[-1], err
    assert "Traceback" not in "".join(err) and len(err) <= 3
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dirs


def test_pretrained_offline_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    """In huggingface_hub's offline mode pretrained weights must come from the (emptied) hub cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["vit_tiny", "--weights", "pretrained", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("colln: error: weights: cannot get pretrained weights") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_force(digits_export: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in digits_export.iterdir()}
    assert main(["digits_vit", "--out", str(digits_export)]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in digits_export.iterdir()} == before


def test_verbose_shows_the_traceback(tmp_path: Path, capsys) -> None:
    assert main(["digits_vit", "--keep", "2", "--weights", "random", "--out", str(tmp_path / "o"), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("use e.g. 0.7 to keep 70% of the tokens")


def test_installed_command(tmp_path: Path) -> None:
    """The console script from a clean install: bad input is one line on stderr, exit 2."""
    exe = Path(sys.executable).with_name("colln-export")
    proc = subprocess.run(
        [str(exe), "digits_vit", "--keep", "abc", "--out", str(tmp_path / "o")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and proc.stderr.startswith("colln: error: arguments: --keep must be a number")
    assert proc.stdout == ""


def test_trt_engine_and_triton_repository(tmp_path: Path, digits_weights: str, capsys) -> None:
    """--trt builds model.plan in the export (TensorRT, or TensorRT-RTX without a GPU); --triton-repo
    writes the Triton entry for the final export directory."""
    from colln.errors import BackendUnavailableError
    from colln.export.tensorrt import trt_module

    try:
        trt_module()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    out, repo = tmp_path / "digits", tmp_path / "repo"
    argv = ["digits_vit", "--weights", digits_weights, "--out", str(out), "--no-validate", "--no-latency"]
    assert main([*argv, "--trt", "--batch-opt", "2", "--batch-max", "4", "--triton-repo", str(repo)]) == 0
    # The plan was built from this export's graph (its metadata records the graph's sha256).
    assert json.loads((out / "model.plan.json").read_text())["onnx_sha256"] == file_sha256(out / "model.onnx")
    assert (out / "model.plan").is_file()
    assert (repo / "digits" / "config.pbtxt").is_file() and (repo / "digits" / "1" / "model.onnx").is_file()
    text = capsys.readouterr().out
    assert "TensorRT" in text and "Triton" in text
    assert not list(tmp_path.glob(".digits.tmp-*"))


@pytest.mark.slow
def test_vit_base_random_export(tmp_path: Path) -> None:
    """The suite's one vit_base export: EViT's plan (K = 138, 97, 68), ONNX Runtime at several batch
    sizes, and a validation that passes although random weights are full of near-ties (the report
    shows the margins and which kept-set flips they explain)."""
    out = tmp_path / "vit_base"
    assert main(["vit_base", "--keep", "0.7", "--weights", "random", "--out", str(out), "--no-latency", "--val-limit", "4"]) == 0
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert topk_constants(proto) == [138, 97, 68]
    session = ort.InferenceSession(str(out / "model.onnx"))
    for batch in (1, 3):
        (logits,) = session.run(None, {"images": np.zeros((batch, 3, 224, 224), np.float32)})
        assert logits.shape == (batch, 1000) and np.isfinite(logits).all()
    v = json.loads((out / "report.json").read_text())["validation"]
    assert v["passed"] and v["kept_sets_observed"] and v["images"] == 4
    assert all(layer["min_margin"] is not None and layer["compared_images"] is not None for layer in v["layers"])

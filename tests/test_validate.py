"""Validation: colln-validate per backend, doctored graphs caught (exit 1), the tie rule on
hand-made scores, and ONNX Runtime's observed kept sets for every selection variant."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from colln.app.validate_cli import main
from colln.data import ValImages, load_labelled, validation_images
from colln.errors import ExportError, ValidationFailedError
from colln.export.artifact import export_into, write_ort_artifact
from colln.export.onnx import with_kept_outputs
from colln.export.spec import ExportSpec, file_sha256
from colln.infer.runners import open_runner
from colln.models.config import PruneConfig
from colln.verify.validate import TOLERANCES, Reference, compare, required_judged, validate


def test_onnxruntime_backend_passes(digits_export: Path, tmp_path: Path, capsys) -> None:
    assert main([str(digits_export), "--backend", "onnxruntime", "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and v["kept_sets_observed"] and v["mismatches"] == []
    assert all(layer["compared_images"] and layer["mean_overlap"] > 0.99 for layer in v["layers"])
    assert "colln-validate" in capsys.readouterr().out


def test_torch_backend_matches_itself(digits_export: Path, tmp_path: Path) -> None:
    assert main([str(digits_export), "--backend", "torch", "--val-limit", "64", "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and not v["kept_sets_observed"] and v["max_abs_error"] == 0.0 and v["top1_agreement"] == 1.0


def _doctored(export: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``export`` with ``edit`` made to its graph, and model.ort.onnx and the manifest
    rewritten from it as colln-export writes them: a consistent export that computes the wrong thing."""
    out = tmp_path / "doctored"
    shutil.copytree(export, out)
    proto = onnx.load(str(out / "model.onnx"))
    edit(proto)
    onnx.save(proto, str(out / "model.onnx"))
    replace(ExportSpec.read(out), artifacts=write_ort_artifact(proto, out)).write(out)
    return out


def _shift_head_bias(proto: onnx.ModelProto) -> None:
    (init,) = [t for t in proto.graph.initializer if t.name == "head.bias"]
    bias = numpy_helper.to_array(init).copy()
    bias[3] += 0.5
    init.CopyFrom(numpy_helper.from_array(bias, init.name))


def _select_smallest(proto: onnx.ModelProto) -> None:
    topk = next(n for n in proto.graph.node if n.op_type == "TopK")
    kept = [a for a in topk.attribute if a.name != "largest"]
    del topk.attribute[:]
    topk.attribute.extend([*kept, onnx.helper.make_attribute("largest", 0)])


@pytest.mark.parametrize(
    ("edit", "expected"),
    [(_shift_head_bias, "max |logit error| above the tolerance"), (_select_smallest, "outside PyTorch's tie band")],
)
def test_doctored_graph_fails_with_exit_1(digits_export: Path, tmp_path: Path, capsys, edit, expected: str) -> None:
    doctored = _doctored(digits_export, tmp_path, edit)
    assert main([str(doctored), "--val-limit", "64", "--json", str(tmp_path / "v.json")]) == 1
    err = capsys.readouterr().err
    assert "colln: error: validate: onnxruntime disagrees with torch:" in err and "Traceback" not in err
    v = json.loads((tmp_path / "v.json").read_text())
    assert not v["passed"] and any(expected in m for m in v["mismatches"]), v["mismatches"]


def test_no_fail_reports_but_exits_0(digits_export: Path, tmp_path: Path) -> None:
    doctored = _doctored(digits_export, tmp_path, _shift_head_bias)
    assert main([str(doctored), "--val-limit", "16", "--no-fail"]) == 0


def test_random_weights_export_validates_in_a_new_process(tmp_path: Path) -> None:
    """--weights random is timm's init under a fixed seed: colln-validate rebuilds the same model."""
    import subprocess
    import sys

    export_into(ExportSpec(model="digits_vit", weights="random"), tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "colln.app.validate_cli", str(tmp_path), "--val-limit", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "passed" in result.stdout


def test_not_an_export_exits_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert "is not a colln export" in capsys.readouterr().err


def _reference(scores: np.ndarray, k: int, logits: np.ndarray) -> Reference:
    kept = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return Reference(outputs=logits, unpruned=logits, kept={0: kept}, scores={0: scores})


def _compare(ref: Reference, logits: np.ndarray, cand_kept: dict | None, k: int):
    return compare(ref, logits, cand_kept, [(0, k)], "colln", False, TOLERANCES["fp32"], None, "cand", "fp32", "test")


def test_tie_rule_on_hand_made_scores() -> None:
    scores = np.array([[0.9, 0.8, 0.5, 0.5, 0.1, 0.0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]], dtype=np.float32)
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    ref = _reference(scores, 3, logits)
    same = _compare(ref, logits.copy(), {0: ref.kept[0].copy()}, 3)
    assert same.passed and same.judged_images == 2 and same.layers[0].identical_fraction == 1.0
    # Image 0 swaps token 2 for its exact tie 3 (explained); image 1 keeps token 5, far below the k-th score.
    cand = np.array([[0, 1, 3], [0, 1, 5]])
    report = _compare(ref, logits.copy(), {0: cand}, 3)
    layer = report.layers[0]
    assert (layer.diverged_here, layer.explained, report.judged_images) == (2, 1, 0)
    assert layer.mean_overlap == pytest.approx(2 / 3)
    assert "image 1" in report.mismatches[0] and "tie band" in report.mismatches[0]
    # Neither image judged: too few, besides.
    assert len(report.mismatches) == 2 and report.mismatches[1].startswith("too few images judged end to end: 0 of 2")
    assert layer.min_margin == pytest.approx(0.0) and layer.tied_images == 1
    # Only the explained divergence is called a near-tie; the other one is the mismatch above.
    assert report.warnings == [
        "1 of 2 images kept a different token set on a near-tie (within tie_rtol 0.0001); left out of the logit checks"
    ]
    # Every image outside the band (a graph with other weights): mismatches only, no near-tie count.
    far = _compare(ref, logits.copy(), {0: np.array([[0, 1, 5], [0, 1, 5]])}, 3)
    assert not far.passed and "2 image(s) kept tokens outside" in far.mismatches[0]
    assert not any("near-tie" in w for w in far.warnings), far.warnings


def test_margin_rule_without_kept_sets() -> None:
    """A backend that cannot report kept tokens: a tied image whose outputs differ is left out (a
    flipped choice may explain it), one whose outputs agree anyway is judged; the others judged."""
    scores = np.array([[0.9, 0.8, 0.5, 0.5, 0.1, 0.0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]], dtype=np.float32)
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    ref = _reference(scores, 3, logits)
    wild_on_tie = np.array([[0.0, 5.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    report = _compare(ref, wild_on_tie, None, 3)
    # One of two images judged: the tied one is no failure, but too little was judged to pass.
    assert report.judged_images == 1 and report.top1_agreement == 0.5
    assert [m.split(";")[0] for m in report.mismatches] == ["too few images judged end to end: 1 of 2, at least 2 needed"]
    tie_warning = (
        "1 of 2 images have a near-tied selection (relative margin within tie_rtol 0.0001) and cand does not report that choice "
        "(ONNX Runtime's graph reports kept tokens; no backend reports ToMe's matching); left out of the logit checks "
        "unless their outputs agree anyway"
    )
    assert report.warnings == [tie_warning]
    # The tied image within the tolerances (1e-3 * max(1, 3) = 3e-3 here): judged, so both are.
    close_on_tie = logits + np.array([[2e-3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    report = _compare(ref, close_on_tie, None, 3)
    assert report.passed and report.judged_images == 2 and report.max_abs_error_judged == pytest.approx(2e-3, rel=1e-4)
    assert report.warnings == [
        tie_warning,
        "1 of those images with a near-tied choice agree with torch within the tolerances anyway: judged",
    ]
    # Just outside them: left out again.
    report = _compare(ref, logits + np.array([[4e-3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32), None, 3)
    assert report.judged_images == 1 and not report.passed
    off = np.array([[0.0, 5.0, 0.0], [0.0, 2.0, 1.1]], dtype=np.float32)
    report = _compare(ref, off, None, 3)
    # Plain formulas: max |error| 0.1 > 1e-3 * max(1, 2); cosine of (0,2,1) and (0,2,1.1).
    cos = (4 + 1.1) / (np.sqrt(5) * np.sqrt(4 + 1.21))
    assert report.max_abs_error == pytest.approx(4.0) and report.min_cosine_judged == pytest.approx(cos)
    assert len(report.mismatches) == 3 and all("image 1" in m for m in report.mismatches[:2])


@pytest.mark.parametrize(
    "variant",
    [
        {"metric": "correct", "rescue": 0.4},
        {"metric": "cls", "fuse": True},
        {"metric": "colln", "fuse": True, "spatial_order": True},
    ],
    ids=["correct", "cls-fuse", "colln-fuse-spatial"],
)
def test_observed_kept_sets_for_every_variant(tmp_path: Path, digits_weights: str, variant: dict) -> None:
    exported = export_into(ExportSpec(model="digits_vit", weights=digits_weights, pruning=PruneConfig(**variant)), tmp_path)
    images = validation_images("digits_vit", exported.unpruned, limit=64)
    runner = open_runner(tmp_path, "onnxruntime", record_kept=True)
    report = validate(exported.pruned, exported.unpruned, runner, images)
    assert report.kept_sets_observed and report.passed, report.mismatches
    assert report.layers[0].mean_overlap > 0.99 and report.judged_images >= 60


def test_kept_outputs_must_match_the_plan(digits_export: Path) -> None:
    proto = onnx.load(str(digits_export / "model.onnx"))
    plan = ExportSpec.read(digits_export).keep_plan()
    debug = with_kept_outputs(proto, plan.pruned_layers)
    assert [o.name for o in debug.graph.output] == ["logits", "colln_kept_L2_0", "colln_kept_L4_0", "colln_kept_L6_0"]
    assert len(proto.graph.output) == 1  # the shipped graph is untouched
    with pytest.raises(ExportError, match="sum to"):
        with_kept_outputs(proto, [(2, 44)])


def test_validation_images_from_a_directory(tmp_path: Path, digits_export: Path) -> None:
    from colln.models import bundled

    for i, img in enumerate(bundled.load_split("test").images[:5]):
        img.save(tmp_path / f"{i}.png")
    model = ExportSpec.read(digits_export).load_unpruned()
    images = validation_images("digits_vit", model, tmp_path)
    assert images.images.shape == (5, 3, 32, 32) and images.labels is None and images.source == str(tmp_path)
    assert isinstance(images, ValImages) and images.images.dtype == np.float32


def test_validation_images_from_an_image_folder_bring_its_labels(tmp_path: Path) -> None:
    """Class folders the label rule maps give labels (hidden folders ignored); others are unlabelled images."""
    from colln import load_model
    from colln.models import bundled

    model = load_model("digits_vit")
    split = bundled.load_split("test")
    for name, root in (("named", tmp_path / "digits"), ("pets", tmp_path / "pets")):
        for i in range(6):
            label = int(split.labels[i])
            folder = root / (str(label) if name == "named" else ("cat", "dog", "emu")[i % 3])
            folder.mkdir(parents=True, exist_ok=True)
            split.images[i].save(folder / f"{i}.png")
        (root / ".ipynb_checkpoints").mkdir()
        split.images[0].save(root / ".ipynb_checkpoints" / "0.png")
    labelled = validation_images("digits_vit", model, tmp_path / "digits")
    expected = sorted((int(split.labels[i]), i) for i in range(6))
    assert labelled.labels.tolist() == [label for label, _ in expected]
    assert labelled.source == f"{tmp_path / 'digits'} (labelled by folder)"
    unlabelled = validation_images("digits_vit", model, tmp_path / "pets")
    assert unlabelled.labels is None and unlabelled.images.shape[0] == 6
    # A limit means one thing for every command: N images spread evenly over the set (colln.data.pick),
    # here the first, a middle and the last of the folder's files (listed class by class).
    spread = [expected[i][0] for i in (0, 2, 5)]  # linspace(0, 5, 3) = 0, 2.5 -> 2, 5
    assert validation_images("digits_vit", model, tmp_path / "digits", limit=3).labels.tolist() == spread
    assert load_labelled(str(tmp_path / "digits"), model, limit=3).labels.tolist() == spread
    assert validation_images("digits_vit", model, tmp_path / "pets", limit=3).images.shape[0] == 3
    n = len(split.labels)
    picked = [0, round((n - 1) / 3), round(2 * (n - 1) / 3), n - 1]
    assert validation_images("digits_vit", model, limit=4).labels.tolist() == split.labels[picked].tolist()
    assert load_labelled("digits", model, limit=4).labels.tolist() == split.labels[picked].tolist()


@pytest.mark.gpu
def test_tensorrt_backend(digits_export: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with TensorRT")
    from colln.export.tensorrt import build_engine

    export = tmp_path / "trt"
    shutil.copytree(digits_export, export)
    build_engine(export)
    assert main([str(export), "--backend", "tensorrt", "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["passed"]


def test_the_table_shows_the_cosine_the_verdict_used() -> None:
    """With images left out (near-ties), the verdict judged the cosine on the judged images: the
    line shows that value first, the all-image one (low by construction) beside it."""
    from colln.report.render import validation_lines

    scores = np.array([[0.9, 0.8, 0.5, 0.5, 0.1, 0.0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]], dtype=np.float32)
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    report = _compare(_reference(scores, 3, logits), np.array([[0.0, 5.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32), None, 3)
    assert report.judged_images == 1 and report.min_cosine < 0.5 and report.min_cosine_judged == pytest.approx(1.0)
    (line,) = [line for line in validation_lines(report) if line.startswith("logits:")]
    assert f"min cosine 1.000000 judged ({report.min_cosine:.6f} over all images)" in line, line
    judged_all = _compare(_reference(scores[1:], 3, logits[1:]), logits[1:].copy(), None, 3)
    (line,) = [line for line in validation_lines(judged_all) if line.startswith("logits:")]
    assert line.endswith("min cosine 1.000000"), line


def test_too_few_judged_images_fail_with_their_own_message() -> None:
    """Images left out as near-ties are no evidence: a validation that judged fewer than half of its
    images, or fewer than 30, fails, saying so (not that the backend disagrees)."""
    assert [required_judged(n) for n in (1, 8, 30, 40, 60, 61, 450)] == [1, 8, 30, 30, 30, 31, 225]
    n, k = 40, 3
    # Every image has an exact tie at the k-th score (tokens 2 and 3).
    scores = np.tile(np.array([0.9, 0.8, 0.5, 0.5, 0.1, 0.0], dtype=np.float32), (n, 1))
    logits = np.random.default_rng(0).normal(size=(n, 10)).astype(np.float32)
    ref = _reference(scores, k, logits)

    def swapped(count: int) -> np.ndarray:
        """The candidate's picks: token 3 for its exact tie 2 on the first ``count`` images."""
        cand = ref.kept[0].copy()
        cand[:count] = [0, 1, 3]
        return cand

    enough = _compare(ref, logits.copy(), {0: swapped(10)}, k)
    assert enough.passed and enough.judged_images == 30 and enough.judged_required == 30
    report = _compare(ref, logits.copy(), {0: swapped(25)}, k)
    assert report.judged_images == 15 and not report.passed and report.to_dict()["passed"] is False
    assert report.to_dict()["judged_required"] == 30
    assert report.mismatches == [
        "too few images judged end to end: 15 of 40, at least 30 needed; the others were left out of the logit checks "
        "(see the warnings and mismatches): validate on more images, or at a precision with fewer near-ties"
    ]
    with pytest.raises(ValidationFailedError, match=r"^cand could not be validated against torch: too few images judged"):
        report.raise_if_failed()
    # Nothing judged: a failure too, blaming random weights only where the weights are random.
    args = ([(0, k)], "colln", False, TOLERANCES["fp32"], None, "cand", "fp32", "test")
    none = compare(ref, logits.copy(), {0: swapped(n)}, *args)
    assert none.judged_images == 0 and none.mismatches[0].startswith("too few images judged end to end: 0 of 40")
    assert not any("random" in m for m in none.mismatches + none.warnings)
    random = compare(ref, logits.copy(), {0: swapped(n)}, *args, random_weights=True)
    assert random.mismatches[0].endswith(
        "random weights attend almost uniformly, so their selections are near-ties: validate trained weights"
    )


def test_onnxruntime_validation_runs_the_listed_ort_file(digits_export: Path, tmp_path: Path, capsys) -> None:
    """model.ort.onnx is what ONNX Runtime runs (colln-bench, colln-serve, Triton): validation runs it
    too, refused when it no longer matches export.json, and judged when it does."""
    copy = shutil.copytree(digits_export, tmp_path / "copy")
    ort_file = copy / "model.ort.onnx"
    proto = onnx.load(str(ort_file))
    (init,) = [t for t in proto.graph.initializer if t.name == "head.weight"]
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(proto, str(ort_file))
    assert main([str(copy), "--val-limit", "32"]) == 2
    assert "model.ort.onnx is missing or does not match export.json" in capsys.readouterr().err
    # The manifest re-hashed to the negated head: it is what runs, and validation judges it.
    spec = ExportSpec.read(copy)
    listed = {**spec.artifacts["onnxruntime"], "sha256": file_sha256(ort_file)}
    replace(spec, artifacts={**spec.artifacts, "onnxruntime": listed}).write(copy)
    assert main([str(copy), "--val-limit", "32", "--json", str(tmp_path / "v.json")]) == 1
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["accuracy"]["onnxruntime"] < 0.2 < v["accuracy"]["torch"]
    assert any("max |logit error| above the tolerance" in m for m in v["mismatches"]), v["mismatches"]
    ort_file.unlink()
    assert main([str(copy), "--val-limit", "32"]) == 2
    assert "model.ort.onnx is missing" in capsys.readouterr().err


def test_an_accuracy_gate_finer_than_one_image_is_said() -> None:
    """0.5 points on 40 labelled images: one image is 2.5 points, so one flip fails the gate, and the
    report says so; on 300 images (0.33 points each) it does not."""
    gate = replace(TOLERANCES["fp32"], max_accuracy_drop=0.005)
    for n, said in ((40, True), (300, False)):
        scores = np.tile(np.array([0.9, 0.8, 0.5, 0.3, 0.1, 0.0], dtype=np.float32), (n, 1))
        logits = np.tile(np.array([3.0, 1.0, 0.0], dtype=np.float32), (n, 1))
        labels = np.zeros(n, dtype=np.int64)
        report = compare(
            _reference(scores, 3, logits), logits.copy(), None, [(0, 3)], "colln", False, gate, labels, "cand", "fp32", "test"
        )
        assert report.passed and report.accuracy["cand"] == 1.0
        warned = [w for w in report.warnings if w.startswith("the accuracy gate (0.5 points) is finer than one image")]
        expected = (
            "the accuracy gate (0.5 points) is finer than one image of 40 (2.50 points): one image the candidate gets "
            "wrong and torch right fails it; validate on more labelled images or raise --max-accuracy-drop"
        )
        assert warned == ([expected] if said else [])

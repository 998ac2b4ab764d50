"""colln-eval against an independent computation: every accuracy recomputed here by running
colln.prune + the model directly on the same images, the budget pick redone by hand from the JSON."""

import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colln import load_model, plan_for, prune
from colln.app import eval_cli
from colln.data import load_labelled, preprocess, skimage_photos
from colln.errors import DataError
from colln.export.spec import ExportSpec
from colln.infer.timing import LatencyStats, Timing
from colln.jobs.evaluate import KEEP_PLOT, PARETO_PLOT, RESULTS_JSON, RESULTS_MD
from colln.measure import sweep as ev
from colln.models import bundled
from colln.models.config import PruneConfig

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "bundled"
KEEPS = (0.5, 1.0)
METRICS = ("colln", "cls", "correct")


def _predict(
    model: torch.nn.Module,
    x: torch.Tensor,
) -> np.ndarray:
    with torch.no_grad():
        return model(x).argmax(-1).numpy()


@pytest.fixture(scope="module")
def digits_model() -> torch.nn.Module:
    return load_model("digits_vit", WEIGHTS)


@pytest.fixture(scope="module")
def digits_test() -> bundled.DigitsSplit:
    return bundled.load_split("test")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[dict, str]:
    """One colln-eval run on the whole bundled test split, early schedule."""
    out = tmp_path_factory.mktemp("eval") / "digits"
    argv = ["digits_vit", "--weights", WEIGHTS, "--schedule", "early", "--keep", ",".join(map(str, KEEPS))]
    argv += ["--metric", ",".join(METRICS), "--batch", "512", "--rounds", "3", "--warmup", "1", "--out", str(out)]
    assert eval_cli.main(argv) == 0
    return json.loads((out / RESULTS_JSON).read_text()), str(out)


def test_results_record_the_timing(digits_run):
    """--rounds 3 --warmup 1 given, the runtime's threads by default: recorded as colln-bench records them."""
    result, out = digits_run
    assert result["timing"] == Timing(rounds=3, warmup=1).to_dict()
    assert result["baseline"]["latency"]["rounds"] == 3
    assert ev.Sweep.from_dict(result).timing == Timing(rounds=3, warmup=1)
    assert "rounds 3, warm-up 1, threads runtime default" in Path(out, RESULTS_MD).read_text()


def test_schedules_scale_the_paper_blocks():
    assert ev.schedule_layers("early", 12) == (0, 3, 6)
    assert ev.schedule_layers("evit", 12) == (3, 6, 9)
    # 8 blocks: 0, 3 * 8 / 12 = 2, 6 * 8 / 12 = 4.
    assert ev.schedule_layers("early", 8) == (0, 2, 4)


def test_sweep_accuracy_matches_direct_prune(digits_run, digits_model, digits_test):
    result, _ = digits_run
    x = preprocess(digits_test.images, digits_model)
    labels = digits_test.labels
    base_pred = _predict(digits_model, x)
    assert result["num_images"] == len(labels) == 450
    assert result["baseline"]["accuracy"] == pytest.approx(float((base_pred == labels).mean()))
    assert result["baseline"]["agreement"] == 1.0
    assert len(result["rows"]) == len(KEEPS) * len(METRICS)
    for row in result["rows"]:
        assert tuple(row["layers"]) == (0, 2, 4)
        pred = _predict(prune(digits_model, keep=row["keep"], layers=(0, 2, 4), metric=row["metric"], norm=4), x)
        assert row["accuracy"] == pytest.approx(float((pred == labels).mean())), row
        assert row["agreement"] == pytest.approx(float((pred == base_pred).mean())), row
        if row["keep"] == 1.0:
            assert row["agreement"] == 1.0
            assert row["accuracy"] == result["baseline"]["accuracy"]
            assert row["keep_counts"] == [64, 64, 64]
        else:
            # 64 patches halved three times, k = ceil(0.5 * candidates).
            assert row["keep_counts"] == [32, 16, 8]
            assert row["flops_ratio"] < 1.0
        assert row["speedup_iqr"][0] <= row["speedup"] <= row["speedup_iqr"][1]


def test_speedup_is_the_median_of_paired_per_round_ratios(monkeypatch, tmp_path):
    """The statistic colln-bench and colln-export report: with per-round times whose ratio of p50s (1.0)
    differs from the median of the per-round ratios (1.5), the sweep reports the latter."""
    from colln.infer import timing

    crafted = {"0": np.array([1.0, 2.0, 3.0]), "1": np.array([3.0, 1.0, 2.0])}

    def measure(runners, input_shape, batches, how, baseline, sample):
        assert how == Timing(rounds=3, warmup=0)
        assert sorted(runners) == sorted(crafted) and baseline == "0"
        times = {name: crafted[name] * 1e-3 for name in runners}
        stats = {name: LatencyStats.from_times(t, batches[0]) for name, t in times.items()}
        return {batches[0]: timing.Comparison(batches[0], stats, {"1": timing.paired_speedup(times["0"], times["1"])}, times)}

    monkeypatch.setattr(ev, "measure", measure)
    options = ev.SweepOptions(keeps=(0.5,), layers=((0, 2, 4),), metrics=("colln",), timing=Timing(rounds=3, warmup=0))
    result = ev.sweep(
        ExportSpec("digits_vit", weights=WEIGHTS), load_labelled("digits", load_model("digits_vit", WEIGHTS), 20), options
    )
    (row,) = result.rows
    ratios = crafted["0"] / crafted["1"]
    assert result.speedup(row) == pytest.approx(float(np.median(ratios))) == pytest.approx(1.5)
    assert row.latency.p50_ms == pytest.approx(result.baseline.latency.p50_ms)  # the old statistic would say 1.0x
    assert ev.pick(result, target_speedup=1.4) == row  # --target-speedup reads the same statistic
    assert ev.Sweep.from_dict(result.to_dict()).speedup(ev.Sweep.from_dict(result.to_dict()).rows[0]) == pytest.approx(1.5)


def test_outputs_are_readable(digits_run):
    _, out = digits_run
    md = Path(out, RESULTS_MD).read_text()
    assert "| metric | keep 0.5 | keep 1 |" in md
    assert "| Col-Ln |" in md and "| [CLS] |" in md
    flops = plan_for(load_model("digits_vit", "random"), keep=0.5, layers=(0, 2, 4)).flops()
    assert f"| FLOPs / unpruned | {flops.pruned / flops.full:.2f} | 1.00 |" in md
    for name in (KEEP_PLOT, PARETO_PLOT):
        with Image.open(f"{out}/{name}") as img:
            assert img.format == "PNG"
            assert img.width >= 500 and img.height >= 400


def test_budget_picker_chooses_the_hand_computed_row(digits_run):
    result, _ = digits_run
    rows = result["rows"]
    budget = float(np.median([r["latency"]["p50_ms"] for r in rows]))
    fitting = [r for r in rows if r["latency"]["p50_ms"] <= budget]
    best_acc = max(r["accuracy"] for r in fitting)
    by_hand = min((r for r in fitting if r["accuracy"] == best_acc), key=lambda r: r["latency"]["p50_ms"])
    chosen = ev.pick(ev.Sweep.from_dict(result), latency_budget_ms=budget)
    assert (chosen.metric, chosen.keep, list(chosen.layers)) == (by_hand["metric"], by_hand["keep"], by_hand["layers"])

    target = float(np.median([r["speedup"] for r in rows]))
    fast = [r for r in rows if r["speedup"] >= target]
    by_hand = max(fast, key=lambda r: (r["accuracy"], -r["latency"]["p50_ms"]))
    chosen = ev.pick(ev.Sweep.from_dict(result), target_speedup=target)
    assert (chosen.metric, chosen.keep) == (by_hand["metric"], by_hand["keep"])
    assert shlex.split(ev.export_command(chosen, ExportSpec("digits_vit"))) == [
        "colln-export", "digits_vit", "--keep", f"{by_hand['keep']:g}", "--layers", "0,2,4",
        "--metric", by_hand["metric"], *(["--norm", "4"] if by_hand["metric"] != "cls" else []),
    ]  # fmt: skip


def test_export_command_flags():
    row = ev.Row("correct", 2.0, 0.6, (0, 3), (39, 24), 0.5, 0.9, 0.95, LatencyStats(1, 1, 1.0, 1.0, 1.0, 1.0, 1e3))
    spec = ExportSpec("vit_small", weights="my weights.safetensors", img_size=256, pruning=PruneConfig(rescue=0.4, fuse=True))
    assert shlex.split(ev.export_command(row, spec)) == [
        "colln-export", "vit_small", "--keep", "0.6", "--layers", "0,3", "--metric", "correct", "--norm", "2",
        "--rescue", "0.4", "--fuse", "--weights", str(Path("my weights.safetensors").absolute()), "--img-size", "256",
    ]  # fmt: skip
    assert row.key == "correct-n2-keep0.6-L0.3"


def test_export_command_carries_every_setting_of_the_sweeps_base():
    """The sweep builds each row over the base's settings (configurations), so the printed command
    gives them too: rounding, spatial order, the merge weighting and proportional attention."""
    stats = LatencyStats(1, 1, 1.0, 1.0, 1.0, 1.0, 1e3)
    merged = ev.Row("colln", 4.0, 0.5, (1, 3), (9, 5), 0.5, 0.9, 0.95, stats, method="merge", precision="int8")
    base = PruneConfig(round_to=8, spatial_order=True, merge_weight="score", prop_attn=False)
    assert ev.export_command(merged, ExportSpec("digits_vit", pruning=base)) == (
        "colln-export digits_vit --keep 0.5 --layers 1,3 --metric colln --norm 4 --spatial-order --round-to 8 "
        "--merge --merge-weight score --no-prop-attn --precision int8"
    )
    assert merged.key == "colln-n4-keep0.5-L1.3-merge-int8"
    tome = ev.Row("colln", 4.0, 1.0, (), (), 0.5, 0.9, 0.95, stats, method="tome", r=8)
    assert ev.export_command(tome, ExportSpec("digits_vit", pruning=PruneConfig(prop_attn=False))) == (
        "colln-export digits_vit --tome 8 --no-prop-attn"
    )
    assert tome.key == "tome-r8"


def test_picked_command_exports_the_picked_configuration(digits_run, tmp_path):
    """The printed colln-export call, run as printed, builds exactly the chosen row's keep plan."""
    from colln.app import export_cli

    result, _ = digits_run
    chosen = ev.pick(ev.Sweep.from_dict(result), latency_budget_ms=1e9)
    argv = shlex.split(ev.export_command(chosen, ExportSpec("digits_vit")))[1:]
    out = tmp_path / "export"
    assert export_cli.main([*argv, "--no-validate", "--no-latency", "--out", str(out)]) == 0
    plan = ExportSpec.read(out).keep_plan()
    assert (plan.config.metric, plan.config.norm, plan.layers, plan.keep_counts) == (
        chosen.metric,
        chosen.norm,
        chosen.layers,
        chosen.keep_counts,
    )


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, digits_test) -> tuple[str, list[int]]:
    """An ImageFolder of real digit scans: 4 images of each class 0..9 in ``<class>/`` folders."""
    root = tmp_path_factory.mktemp("folder")
    # A stray hidden folder (with an image) is not a class and changes no label.
    (root / ".ipynb_checkpoints").mkdir()
    digits_test.images[0].save(root / ".ipynb_checkpoints" / "0-checkpoint.png")
    labels = []
    for cls in range(10):
        (root / str(cls)).mkdir()
        picks = np.flatnonzero(digits_test.labels == cls)[:4]
        for i in picks:
            digits_test.images[i].save(root / str(cls) / f"{i}.png")
        labels += [cls] * len(picks)
    return str(root), labels


def test_image_folder_and_budget_command(digit_folder, digits_model, capsys, tmp_path):
    root, labels = digit_folder
    out = tmp_path / "folder"
    argv = ["digits_vit", "--data", root, "--layers", "0,3", "--keep", "0.3,0.6", "--metric", "colln,cls"]
    argv += ["--norm", "2,4", "--rounds", "2", "--warmup", "0", "--latency-budget", "1e9", "--out", str(out)]
    assert eval_cli.main(argv) == 0
    result = json.loads((out / RESULTS_JSON).read_text())
    # cls has no norm order: one row per keep; colln one per (norm, keep).
    assert sorted((r["metric"], r["norm"], r["keep"]) for r in result["rows"]) == [
        ("cls", 2.0, 0.3), ("cls", 2.0, 0.6),
        ("colln", 2.0, 0.3), ("colln", 2.0, 0.6), ("colln", 4.0, 0.3), ("colln", 4.0, 0.6),
    ]  # fmt: skip
    images = [Image.open(f"{root}/{c}/{name}").convert("RGB") for c in range(10) for name in sorted(os.listdir(f"{root}/{c}"))]
    x = preprocess(images, digits_model)
    for row in result["rows"]:
        pred = _predict(prune(digits_model, keep=row["keep"], layers=(0, 3), metric=row["metric"], norm=row["norm"]), x)
        assert row["accuracy"] == pytest.approx(float((pred == np.array(labels)).mean()))
        assert row["keep_counts"] == [math.ceil(row["keep"] * 64), math.ceil(row["keep"] * math.ceil(row["keep"] * 64))]
    # Everything fits a huge budget: the pick is the most accurate row, ties to the fastest.
    best = max(result["rows"], key=lambda r: (r["accuracy"], -r["latency"]["p50_ms"]))
    norm = f" --norm {best['norm']:g}" if best["metric"] != "cls" else ""  # [CLS] attention reads no norm order
    expected = f"colln-export digits_vit --keep {best['keep']:g} --layers 0,3 --metric {best['metric']}{norm}"
    assert result["pick"]["command"] == expected
    assert expected in capsys.readouterr().out


def test_budget_nobody_meets_exits_2_with_results_written(digit_folder, capsys, tmp_path):
    root, _ = digit_folder
    out = tmp_path / "tight"
    argv = ["digits_vit", "--data", root, "--keep", "0.5", "--metric", "colln", "--rounds", "2", "--warmup", "0"]
    assert eval_cli.main([*argv, "--latency-budget", "1e-6", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("colln: error: pick: no configuration reaches a median latency within 1e-06 ms")
    assert len(err.strip().splitlines()) == 1
    assert json.loads((out / RESULTS_JSON).read_text())["pick"] is None


def _folder(
    root: Path,
    layout: dict[str, int],
) -> Path:
    """An ImageFolder at ``root``: ``layout`` maps a folder name to its number of (photo) images."""
    photos = skimage_photos(["astronaut", "coffee", "chelsea"])
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            photos[i % len(photos)].resize((16, 16)).save(root / name / f"{i}.png")
    return root


def _labels(
    root: Path,
    model: torch.nn.Module,
) -> list[int]:
    return sorted(load_labelled(str(root), model).labels.tolist())


def test_label_rule(tmp_path, digits_model):
    """Class names, then integer indices, then sorted position only when the counts match; hidden
    folders are not classes; anything else is refused in one line."""
    imagenet = load_model("deit_tiny", "random", img_size=32)
    two_classes = load_model("digits_vit", "random")
    two_classes.reset_classifier(2)
    # Integer folders beside a notebook's checkpoint folder (with an image in it): still indices.
    ints = _folder(tmp_path / "ints", {"7": 1, "3": 2, ".ipynb_checkpoints": 1})
    (ints / "3" / ".hidden.png").write_bytes(b"not an image")
    assert _labels(ints, digits_model) == [3, 3, 7]
    assert _labels(ints, imagenet) == [3, 3, 7]
    # ImageNet synsets, any subset: timm's index of each.
    synsets = _folder(tmp_path / "synsets", {"n01443537": 1, "n01440764": 2, "n15075141": 1})
    assert _labels(synsets, imagenet) == [0, 0, 1, 999]
    # No names, as many folders as classes: sorted position.
    assert _labels(_folder(tmp_path / "pets", {"dog": 1, "cat": 2}), two_classes) == [0, 0, 1]
    refused = {
        "names": ({"rocket": 1, "cat": 2}, imagenet, "neither the model's class names nor indices"),
        "mixed": ({"n01440764": 1, "tench": 1}, imagenet, "tench/ of .* are not classes of the model"),
        "beyond": ({"3": 1, "7": 1}, two_classes, "7/ of .* is beyond the model's 2 classes"),
        "not digits": ({"12": 1}, digits_model, "12/ of .* are not classes of the model"),
        "superscript": ({"³": 1, "1": 1}, digits_model, "³/ of .* are not classes of the model"),
        "superscript, no names": ({"³": 1}, two_classes, "neither the model's class names nor indices"),
    }
    for name, (layout, model, message) in refused.items():
        with pytest.raises(DataError, match=message) as info:
            load_labelled(str(_folder(tmp_path / name, layout)), model)
        assert "\n" not in str(info.value) and "rename the folders" in str(info.value), name
    subset = load_labelled("digits", digits_model, limit=10)
    assert len(subset.images) == 10 and len(set(subset.labels.tolist())) > 5


def test_synset_folder_scores_the_unpruned_model_right(tmp_path):
    """A folder per ImageNet synset, holding the photos a random deit_tiny predicts as that synset
    (computed here with plain timm and torch): colln-eval must find the unpruned model right on all."""
    import timm
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    photos = [p.resize((64, 64)) for p in skimage_photos()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # as --weights random
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    with torch.no_grad():
        top2 = model(torch.stack([transform(p) for p in photos])).topk(2, dim=-1)
    assert (top2.values[:, 0] - top2.values[:, 1]).min() > 1e-4  # no near-tie that rounding could flip
    names = ImageNetInfo().label_names()
    root = tmp_path / "synsets"
    for i, (photo, index) in enumerate(zip(photos, top2.indices[:, 0].tolist())):
        (root / names[index]).mkdir(parents=True, exist_ok=True)
        photo.save(root / names[index] / f"{i}.png")
    assert len(list(root.iterdir())) > 1
    out = tmp_path / "eval"
    argv = ["deit_tiny_patch16_224", "--weights", "random", "--data", str(root), "--keep", "0.5", "--metric", "colln"]
    assert eval_cli.main([*argv, "--rounds", "1", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads((out / RESULTS_JSON).read_text())
    assert result["num_images"] == len(photos)
    assert result["baseline"]["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("argv", "stage"),
    [
        (["--data", "/nonexistent/folder"], "data"),
        (["--schedule", "late"], "arguments"),
        (["--metric", "entropy"], "arguments"),
        (["--keep", "1.5"], "plan"),
        (["--latency-budget", "5", "--target-speedup", "2"], "arguments"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, stage, capsys, tmp_path):
    assert eval_cli.main(["digits_vit", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"colln: error: {stage}: ") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_existing_out_needs_force(digits_run, capsys):
    _, out = digits_run
    assert eval_cli.main(["digits_vit", "--keep", "0.5", "--metric", "colln", "--out", out]) == 2
    assert "--force" in capsys.readouterr().err


def test_pareto_front_by_hand():
    points = [(5.0, 90.0), (3.0, 80.0), (4.0, 70.0), (6.0, 90.0), (2.0, 60.0), (7.0, 95.0)]
    assert ev.pareto_front(points) == [(2.0, 60.0), (3.0, 80.0), (5.0, 90.0), (7.0, 95.0)]


def test_onnxruntime_backend_matches_pytorch(digits_model, digits_test, tmp_path):
    """The exported graphs score like the PyTorch models (trained weights: no near-tied top-k)."""
    out = tmp_path / "ort"
    argv = ["digits_vit", "--backend", "onnxruntime", "--limit", "40", "--keep", "0.5", "--metric", "colln"]
    assert eval_cli.main([*argv, "--schedule", "early", "--rounds", "2", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads((out / RESULTS_JSON).read_text())
    chosen = np.linspace(0, len(digits_test.images) - 1, 40).round().astype(int)
    x = preprocess([digits_test.images[i] for i in chosen], digits_model)
    labels = digits_test.labels[chosen]
    assert result["backend"] == "onnxruntime"
    assert result["baseline"]["accuracy"] == pytest.approx(float((_predict(digits_model, x) == labels).mean()))
    (row,) = result["rows"]
    pred = _predict(prune(digits_model, keep=0.5, layers=(0, 2, 4), metric="colln"), x)
    assert row["accuracy"] == pytest.approx(float((pred == labels).mean()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_device_matches_cpu_accuracy(digits_run, tmp_path):
    """The torch runner on CUDA scores the same configurations as on CPU (trained weights)."""
    cpu, _ = digits_run
    out = tmp_path / "cuda"
    argv = ["digits_vit", "--device", "cuda", "--schedule", "early", "--keep", ",".join(map(str, KEEPS))]
    assert eval_cli.main([*argv, "--metric", ",".join(METRICS), "--rounds", "3", "--out", str(out)]) == 0
    gpu = json.loads((out / RESULTS_JSON).read_text())
    assert gpu["device"] == "cuda"
    for a, b in zip(cpu["rows"], gpu["rows"]):
        assert (a["metric"], a["keep"]) == (b["metric"], b["keep"])
        assert abs(a["accuracy"] - b["accuracy"]) <= 2 / cpu["num_images"]


# --- issue 26: torchrun with an empty share, ToMe alone, the OpenVINO commands; issue 28: no backend switch ---


def _row(
    accuracy: float,
    p50_ms: float,
    **fields,
) -> ev.Row:
    """A measured row as the sweep would make it (accuracy, median latency and what differs)."""
    latency = LatencyStats(1, 3, p50_ms, p50_ms, p50_ms, p50_ms, 1e3 / p50_ms)
    defaults = {"metric": "colln", "norm": 4.0, "keep": 0.5, "layers": (1, 3), "keep_counts": (32, 16), "flops_ratio": 0.5}
    return ev.Row(**{**defaults, **fields}, accuracy=accuracy, agreement=accuracy, latency=latency)


def _crafted(
    rows: list[ev.Row],
    backend: str = "torch",
) -> ev.Sweep:
    baseline = _row(0.96, 4.0, metric="none", keep=1.0, layers=(), keep_counts=(), flops_ratio=1.0)
    return ev.Sweep("digits_vit", "bundled", "digits", 10, backend, "cpu", baseline, tuple(rows), timing=Timing(rounds=3))


TOME_ROWS = [_row(0.95, 3.0, keep=1.0, layers=(), keep_counts=(), method="tome", r=8)]
KEEP_ROWS = [_row(0.9, 2.0), _row(0.94, 3.0, keep=0.7)]


def test_tome_alone_writes_the_results_and_skips_the_keep_plot(monkeypatch, tmp_path, caplog, capsys):
    """--method tome alone has no keep rate to draw against: the results and the Pareto plot are
    written, accuracy_vs_keep.png is skipped with a warning, exit 0 (was exit 3, nothing written)."""
    from colln.jobs import evaluate

    caplog.set_level(logging.WARNING, logger=evaluate.__name__)  # whatever level earlier tests left on the root
    monkeypatch.setattr(evaluate, "sweep", lambda *args: _crafted(TOME_ROWS))
    out = tmp_path / "tome"
    assert eval_cli.main(["digits_vit", "--method", "tome", "--tome", "8", "--limit", "10", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([RESULTS_JSON, RESULTS_MD, PARETO_PLOT])
    assert ev.Sweep.from_dict(json.loads((out / RESULTS_JSON).read_text())).rows == tuple(TOME_ROWS)
    with Image.open(out / PARETO_PLOT) as img:
        assert img.format == "PNG"
    assert f"wrote {out}/{RESULTS_JSON}, {RESULTS_MD}, {PARETO_PLOT}\n" in capsys.readouterr().out
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(f"{KEEP_PLOT} not drawn: the sweep has no keep schedule")


def test_a_plot_that_fails_is_skipped_with_a_warning(monkeypatch, tmp_path, caplog):
    from colln.jobs import evaluate

    def fails(result, path):
        raise RuntimeError("no font")

    caplog.set_level(logging.WARNING, logger=evaluate.__name__)
    monkeypatch.setattr(evaluate, "sweep", lambda *args: _crafted(KEEP_ROWS))
    monkeypatch.setattr(evaluate, "plot_pareto", fails)
    out = tmp_path / "eval"
    assert eval_cli.main(["digits_vit", "--keep", "0.5,0.7", "--metric", "colln", "--limit", "10", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([RESULTS_JSON, RESULTS_MD, KEEP_PLOT])
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [f"{PARETO_PLOT} not drawn: no font"]


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """A notebook user's backend (here svg, with pyplot open) is the same after colln draws its
    figures, and pyplot holds none of them."""
    (tmp_path / "sweep.json").write_text(json.dumps(_crafted(KEEP_ROWS + TOME_ROWS).to_dict()))
    script = """
import json, sys
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np
from colln.measure.sweep import Sweep
from colln.report import plots, viz
out = sys.argv[1]
result = Sweep.from_dict(json.load(open(out + "/sweep.json")))
plots.plot_accuracy_vs_keep(result, out + "/keep.png")
plots.plot_pareto(result, out + "/pareto.png")
view = viz.MetricView("colln", [(1, np.arange(8))], 3)
plots.kept_figure(np.zeros((32, 32, 3), np.uint8), [view], (4, 4), "t", out + "/kept.png")
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["svg", "0"]
    for name in ("keep.png", "pareto.png", "kept.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG"


def _torchrun(
    args: list[str],
    tmp_path: Path,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with TMPDIR ``tmp_path/tmp``, bounded: on a
    time-out torchrun is stopped (it SIGKILLs workers that ignore its SIGTERM) and the test fails.
    Output goes to files: a worker left behind would hold a pipe open and block the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("OMP_NUM_THREADS", None)  # torchrun's own: 1 thread per worker
    with open(tmp_path / "torchrun.out", "w+") as out, open(tmp_path / "torchrun.err", "w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"torchrun {' '.join(args)} still running after {timeout} s")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def test_torchrun_with_a_rank_that_gets_no_image(digits_test, digits_model, tmp_path):
    """One image, two processes: rank 1's share is empty. The run finishes as one process would
    (was: both ranks waiting forever in a futex, a temp directory left), records the one thread
    torchrun gave PyTorch, and leaves no temp directory."""
    (tmp_path / "data" / str(digits_test.labels[1])).mkdir(parents=True)
    digits_test.images[1].save(tmp_path / "data" / str(digits_test.labels[1]) / "1.png")
    out = tmp_path / "ev"
    args = ["-m", "colln.app.eval_cli", "digits_vit", "--data", str(tmp_path / "data"), "--keep", "0.5", "--layers", "1,3"]
    proc = _torchrun([*args, "--metric", "colln", "--rounds", "2", "--warmup", "0", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1
    result = json.loads((out / RESULTS_JSON).read_text())
    x = preprocess([digits_test.images[1]], digits_model)
    assert result["num_images"] == 1
    assert result["baseline"]["accuracy"] == float(_predict(digits_model, x)[0] == digits_test.labels[1])
    (row,) = result["rows"]
    pruned = prune(digits_model, keep=0.5, layers=(1, 3), metric="colln")
    assert row["accuracy"] == float(_predict(pruned, x)[0] == digits_test.labels[1])
    assert result["timing"]["threads"] == 1
    assert "threads 1)" in (out / RESULTS_MD).read_text()
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("colln")] == []  # torchrun's own stay


def test_a_collective_times_out_and_the_failing_rank_reports_its_own_error(tmp_path):
    """Rank 1 fails before the sum rank 0 waits in: rank 0 gives up after the group's timeout
    instead of hanging, and rank 1's error is the one it reports (not the barrier's time-out)."""
    script = tmp_path / "mismatch.py"
    script.write_text(
        """
from datetime import timedelta
import torch
from colln.train.distributed import all_sum, process_group
with process_group(torch.device("cpu"), timeout=timedelta(seconds=3)) as ranks:
    if ranks.rank == 1:
        raise ValueError("rank 1 fails")
    all_sum([1.0], ranks)
"""
    )
    proc = _torchrun([str(script)], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "[rank1]: ValueError: rank 1 fails" in proc.stderr
    assert "[rank0]: RuntimeError:" in proc.stderr and "Timed out waiting 3000ms" in proc.stderr


def test_openvino_pick_prints_the_export_that_builds_the_ir(monkeypatch, tmp_path, capsys):
    """An OpenVINO sweep's "reproduce with" command builds the IR it timed (--openvino, at the row's
    precision), in flags colln-export takes."""
    from colln.app import export_cli
    from colln.jobs import evaluate

    rows = [*KEEP_ROWS, _row(0.95, 1.0, keep=0.7, precision="int8")]
    monkeypatch.setattr(evaluate, "sweep", lambda *args: _crafted(rows, backend="openvino"))
    out = tmp_path / "ov"
    argv = ["digits_vit", "--backend", "openvino", "--precision", "fp32,int8", "--keep", "0.5,0.7", "--metric", "colln"]
    assert eval_cli.main([*argv, "--limit", "10", "--latency-budget", "1e9", "--out", str(out)]) == 0
    command = "colln-export digits_vit --keep 0.7 --layers 1,3 --metric colln --norm 4 --precision int8 --openvino"
    assert json.loads((out / RESULTS_JSON).read_text())["pick"]["command"] == command
    assert capsys.readouterr().out.endswith(f"reproduce with:\n{command}\n")
    args = export_cli.build_parser().parse_args(shlex.split(command)[1:])
    assert (args.openvino, args.precision, args.openvino_precision) == (True, "int8", None)
    assert ev.export_command(rows[0], ExportSpec("digits_vit"), backend="openvino").endswith("--norm 4 --openvino")
    assert "--openvino" not in ev.export_command(rows[0], ExportSpec("digits_vit"), backend="onnxruntime")


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_merging_below_fp32_is_refused_as_colln_export_refuses_it(backend, tmp_path, capsys):
    """One rule: what colln-export refuses (--merge / --tome at int8) colln-eval refuses on every
    backend, in one line before anything is built (the OpenVINO path, exporting fp32 graphs, ran it)."""
    out = tmp_path / "x"
    argv = ["digits_vit", "--backend", backend, "--precision", "fp32,int8", "--keep", "0.5", "--metric", "colln"]
    assert eval_cli.main([*argv, "--method", "merge", "--limit", "4", "--rounds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colln: error: arguments: --merge needs --precision fp32: in int8,") and "\n" not in err
    assert not out.exists()


def test_the_reference_page_names_every_option_and_backend():
    """docs/reference/colln-eval.md itself (not another page naming the command) lists every option,
    and the --backend row every backend colln-eval runs."""
    page = (ROOT / "docs" / "reference" / "colln-eval.md").read_text(encoding="utf-8")
    options = {o for action in eval_cli.build_parser()._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert sorted(o for o in options if f"`{o}" not in page) == []
    (backend_row,) = [line for line in page.splitlines() if line.startswith("| `--backend")]
    assert [b for b in ev.EVAL_BACKENDS if b not in backend_row] == []

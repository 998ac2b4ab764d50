"""colln.finetune / colln-finetune on the bundled digits_vit: recovery, outputs, resume, Ctrl-C,
DDP under torchrun, plan check for the export, bad inputs. Small subsets keep it fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

import colln
from colln.app.export_cli import main as export_main
from colln.app.finetune_cli import main
from colln.data import preprocess
from colln.errors import CheckpointError, DataError, PlanMismatchError, TrainingDivergedError, UnsupportedModelError
from colln.models import bundled
from colln.train import checkpoint as ckpt
from colln.train.datasets import DigitsDataset, FolderDataset
from colln.train.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]
EARLY = {"keep": 0.7, "layers": (0, 2, 4)}  # 96.7% -> 73.1% training-free: lots to recover
QUICK = ["--keep", "0.7", "--layers", "0,2,4", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: float reductions run in one order (determinism), and the 2 shared cores are not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return colln.load_model("digits_vit")


@pytest.fixture(scope="module")
def train_subset(model: torch.nn.Module) -> Dataset:
    return Subset(DigitsDataset("train", model, augment=True), range(192))


@pytest.fixture(scope="module")
def val_set(model: torch.nn.Module) -> Dataset:
    return DigitsDataset("test", model, augment=False)


def _accuracy(m: torch.nn.Module, split: str = "test") -> float:
    data = bundled.load_split(split)
    with torch.no_grad():
        pred = m.eval()(preprocess(data.images, m)).argmax(-1).numpy()
    return float((pred == data.labels).mean())


def _loss(
    m: torch.nn.Module,
    subset: Subset,
) -> float:
    """Mean cross-entropy of ``m`` on ``subset``'s images without augmentation."""
    plain = DigitsDataset("train", m, augment=False)
    x = torch.stack([plain[i][0] for i in subset.indices])
    y = torch.tensor([plain[i][1] for i in subset.indices])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(m.eval()(x), y))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# --- API ---------------------------------------------------------------------------------------


def test_finetune_recovers_accuracy_and_leaves_inputs_untouched(model, train_subset, val_set) -> None:
    pruned = colln.prune(model, **EARLY)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = colln.finetune(pruned, train_subset, val=val_set, teacher=model, epochs=2, batch_size=32)
    assert result.initial_val_acc == pytest.approx(_accuracy(pruned))
    assert result.teacher_val_acc == pytest.approx(_accuracy(model))
    assert result.final_val_acc == pytest.approx(_accuracy(result.model))
    assert result.final_val_acc >= result.initial_val_acc + 0.1
    assert [h.epoch for h in result.history] == [1, 2]
    # Learned on what it trained on: lower loss on those images, unaugmented (a per-epoch train loss
    # comparison would also measure the warm-up and the augmentation draws).
    assert _loss(result.model, train_subset) < _loss(pruned, train_subset) - 0.1
    assert result.history[-1].lr < 1e-6 < result.history[0].lr  # cosine to zero over the run
    assert colln.get_plan(result.model).to_dict() == colln.get_plan(pruned).to_dict()
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in model.state_dict().items())


def test_finetune_is_deterministic_under_a_seed(model, train_subset) -> None:
    pruned = colln.prune(model, **EARLY)
    runs = [colln.finetune(pruned, train_subset, teacher=model, epochs=1, batch_size=32, seed=3).model for _ in range(2)]
    other = colln.finetune(pruned, train_subset, teacher=model, epochs=1, batch_size=32, seed=4).model
    a, b, c = (r.state_dict() for r in (*runs, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_finetune_takes_one_recipe_with_keyword_overrides(model, train_subset) -> None:
    pruned = colln.prune(model, **EARLY)
    whole = colln.finetune(pruned, train_subset, recipe=colln.Recipe(epochs=1, batch_size=64, seed=3))
    overridden = colln.finetune(pruned, train_subset, recipe=colln.Recipe(epochs=5, batch_size=64), epochs=1, seed=3)
    assert whole.recipe == overridden.recipe == colln.Recipe(epochs=1, batch_size=64, seed=3, distill_alpha=0.0)
    a, b = whole.model.state_dict(), overridden.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="epoch"):
        colln.finetune(pruned, train_subset, epoch=1)


def test_finetune_refuses_a_model_that_is_not_pruned(model, train_subset) -> None:
    with pytest.raises(UnsupportedModelError, match=r"colln\.prune"):
        finetune(model, train_subset, epochs=1)


def test_resume_after_an_epoch_gives_the_same_model(model, train_subset, tmp_path: Path) -> None:
    pruned = colln.prune(model, **EARLY)
    straight = finetune(pruned, train_subset, teacher=model, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "a")

    def stop_after_first(record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            pruned, train_subset, teacher=model, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "b", on_epoch=stop_after_first
        )
    assert ckpt.load_state(tmp_path / "b" / ckpt.CHECKPOINT)["epoch"] == 1
    resumed = finetune(pruned, train_subset, teacher=model, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "b", resume=True)
    assert [h.epoch for h in resumed.history] == [1, 2]
    s, r = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(s[k], r[k]) for k in s)
    with pytest.raises(CheckpointError, match="other settings"):
        finetune(pruned, train_subset, teacher=model, epochs=3, batch_size=32, checkpoint_dir=tmp_path / "b", resume=True)


class _Poisoned(Dataset):
    """The digits subset, all NaN once ``poison`` is set: the loss becomes NaN from then on."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.poison = base, False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if self.poison else x), y


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model, train_subset, tmp_path: Path) -> None:
    data = _Poisoned(train_subset)
    pruned = colln.prune(model, **EARLY)

    def poison(record) -> None:
        data.poison = True

    with pytest.raises(TrainingDivergedError, match=r"epoch 2 \(step 1\).*epoch 1"):
        finetune(pruned, data, epochs=3, batch_size=32, checkpoint_dir=tmp_path, on_epoch=poison)
    state = ckpt.load_state(tmp_path / ckpt.CHECKPOINT)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


# --- CLI and the files it writes ----------------------------------------------------------------


def test_cli_writes_weights_that_export_loads_with_the_recorded_plan(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    assert main(["digits_vit", *QUICK, "--epochs", "1", "--limit", "96", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "finetune.json", "loss.png", "model.safetensors"]
    record = json.loads((out / ckpt.RECORD).read_text())
    assert record["plan"]["layers"] == [0, 2, 4] and record["config"]["keep"] == 0.7
    assert record["world_size"] == 1 and record["effective_batch_size"] == record["batch_size_per_process"] == 32
    assert record["data"]["train_images"] == 96 and record["data"]["val_images"] == 450
    assert len(record["history"]) == 1 and {"torch", "timm", "colln"} <= set(record["versions"])
    assert (out / ckpt.LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "73.1% ->" in capsys.readouterr().out

    # What colln-export does: the unpruned model with --weights, pruned with the recorded plan.
    config = ckpt.recorded_config(out / ckpt.WEIGHTS)
    assert config == colln.PruneConfig(keep=0.7, layers=(0, 2, 4))
    exported = colln.prune(colln.load_model("digits_vit", weights=str(out / ckpt.WEIGHTS)), config)
    tuned = colln.prune(colln.load_model("digits_vit"), config)
    tuned.load_state_dict(ckpt.load_state(out / ckpt.CHECKPOINT)["model"])
    x = preprocess(bundled.load_split("test").images[:16], tuned)
    with torch.no_grad():
        assert torch.equal(exported.eval()(x), tuned.eval()(x))
    assert _accuracy(exported) == pytest.approx(record["accuracy"]["after"])

    # colln-export itself: another plan is refused in one line and writes nothing; --force warns.
    weights = str(out / ckpt.WEIGHTS)
    argv = ["digits_vit", "--weights", weights, "--keep", "0.5", "--no-validate", "--no-latency"]
    capsys.readouterr()
    assert export_main([*argv, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "colln: error: plan:" in err and "fine-tuned for --keep 0.7 --layers 0,2,4" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    assert export_main([*argv, "--out", str(tmp_path / "forced"), "--force"]) == 0
    assert "warning:" in capsys.readouterr().err and (tmp_path / "forced" / "model.onnx").is_file()


def test_plan_check_for_the_export(tmp_path: Path, model) -> None:
    pruned = colln.prune(model, keep=0.7, layers=(2, 4, 6), fuse=True)
    ckpt.save_weights(pruned, tmp_path / ckpt.WEIGHTS)
    weights = tmp_path / ckpt.WEIGHTS
    assert ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.5), force=False) is None  # nothing recorded
    ckpt.write_record(tmp_path / ckpt.RECORD, {"plan": colln.get_plan(pruned).to_dict()})
    # Default layers of an 8-block model are 2, 4, 6: the same plan, spelt two ways.
    assert ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.7, fuse=True), force=False) is None
    assert (
        ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=(0.7, 0.7, 0.7), layers=(2, 4, 6), fuse=True), force=False)
        is None
    )
    with pytest.raises(
        PlanMismatchError,
        match=r"fine-tuned for --keep 0.7 --layers 2,4,6 --metric colln --norm 4 --fuse, this export asks --keep 0.5",
    ):
        ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.5, fuse=True), force=False)
    with pytest.raises(PlanMismatchError):
        ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.7), force=False)  # fuse differs
    with pytest.raises(PlanMismatchError, match=r"--norm 4 --fuse, this export asks .* --norm 2 --fuse"):
        ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.7, fuse=True, norm=2), force=False)
    assert (
        ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.7, fuse=True, rescue=0.4), force=False) is None
    )  # colln has no rescue
    warning = ckpt.check_recorded_plan(weights, colln.PruneConfig(keep=0.7, layers=(0, 2, 4), fuse=True), force=True)
    assert warning.startswith("warning:") and "--layers 0,2,4" in warning and "\n" not in warning


def test_sigint_saves_a_resumable_checkpoint_and_exits_130(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    argv = ["digits_vit", *QUICK, "--epochs", "5", "--limit", "96", "--no-distill", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "colln.app.finetune_cli", *argv],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/5"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = ckpt.load_state(out / ckpt.CHECKPOINT)
    assert 1 <= state["epoch"] < 5 and state["step"] >= 1  # saved mid-epoch, at a step boundary
    assert not (out / ckpt.WEIGHTS).exists()
    assert main([*argv, "--resume"]) == 0
    record = json.loads((out / ckpt.RECORD).read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4, 5]


def test_torchrun_two_processes_write_one_valid_result(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "colln.app.finetune_cli"]
    cmd += ["digits_vit", *QUICK, "--epochs", "1", "--limit", "128", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("epoch 1/1") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "finetune.json", "loss.png", "model.safetensors"]
    record = json.loads((out / ckpt.RECORD).read_text())
    assert record["world_size"] == 2 and record["batch_size_per_process"] == 32 and record["effective_batch_size"] == 64
    tuned = colln.prune(colln.load_model("digits_vit", weights=str(out / ckpt.WEIGHTS)), ckpt.recorded_config(out / ckpt.WEIGHTS))
    assert _accuracy(tuned) == pytest.approx(record["accuracy"]["after"])
    assert record["accuracy"]["after"] > record["accuracy"]["before"]


def _run(
    cmd: list[str],
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)


def test_torchrun_resumed_mid_epoch_gives_the_model_of_an_unbroken_run(tmp_path: Path) -> None:
    """Ctrl-C under torchrun stops both ranks at one step; --resume must then give, bit for bit, the
    weights of a run that was never stopped: every rank resumes its own augmentation draws."""
    from safetensors.torch import load_file

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, "-m", "colln.app.finetune_cli", "digits_vit", "--keep", "0.7", "--layers", "0,2,4"]
    cmd += ["--batch-size", "8", "--epochs", "2", "--limit", "512", "--no-distill"]
    unbroken = tmp_path / "unbroken"
    proc = _run([*cmd, "--out", str(unbroken)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    stopped = tmp_path / "stopped"
    run = subprocess.Popen([*cmd, "--out", str(stopped)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in run.stdout:
            if line.startswith("epoch 1/2"):
                run.send_signal(signal.SIGINT)  # torchrun passes it on to each rank once
                break
        _, err = run.communicate(timeout=300)
    finally:
        run.kill()
    state = ckpt.load_state(stopped / ckpt.CHECKPOINT)
    steps = 512 // 2 // 8
    assert state["epoch"] == 1 and 1 <= state["step"] < steps, (state["epoch"], state["step"], err[-2000:])
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    proc = _run([*cmd, "--out", str(stopped), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = load_file(str(unbroken / ckpt.WEIGHTS)), load_file(str(stopped / ckpt.WEIGHTS))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.gpu
def test_cuda_bf16_finetune_recovers_accuracy(model, train_subset, val_set) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pruned = colln.prune(model, **EARLY)
    result = colln.finetune(pruned, train_subset, val=val_set, teacher=model, epochs=2, batch_size=32, device="cuda", amp=True)
    assert next(result.model.parameters()).device.type == "cpu"
    assert result.final_val_acc >= result.initial_val_acc + 0.1


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


def _digit_folder(root: Path, per_class: int = 2, classes: list[str] | None = None) -> Path:
    data = bundled.load_split("test")
    for name in classes or [str(i) for i in range(10)]:
        (root / name).mkdir(parents=True)
        picks = np.flatnonzero(data.labels == int(name))[:per_class] if name.isdigit() else range(per_class)
        for j, i in enumerate(picks):
            data.images[i].save(root / name / f"{j}.png")
    return root


def _fails(argv: list[str], capsys, stage: str, words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"colln: error: {stage}:") and words in err and "\n" not in err, err


@pytest.mark.parametrize("case", ["missing", "empty", "classes", "corrupt", "exists", "unwritable", "resume"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    base = ["digits_vit", *QUICK, "--epochs", "1", "--out", str(out)]
    if case == "missing":
        _fails([*base, "--data", str(tmp_path / "nope")], capsys, "data", "is not a directory")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        _fails([*base, "--data", str(tmp_path / "empty")], capsys, "data", "no class subfolders")
    elif case == "classes":
        folder = _digit_folder(tmp_path / "pets", classes=["cat", "dog"])
        _fails([*base, "--data", str(folder)], capsys, "data", "--num-classes 2")
    elif case == "corrupt":
        folder = _digit_folder(tmp_path / "d")
        (folder / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        _fails([*base, "--data", str(folder)], capsys, "data", "1 of 21 images")
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        _fails(base, capsys, "output", "--force")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        return
    elif case == "unwritable":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
        _fails([*base[:-1], str(out)], capsys, "output", "cannot write")
    elif case == "resume":
        _fails([*base, "--resume"], capsys, "output", "nothing to resume")
    assert not out.exists()


def test_folder_data_uses_timm_train_transform_and_skips_a_few_unreadable_images(model, tmp_path: Path) -> None:
    from timm.data import create_transform, resolve_model_data_config

    folder = _digit_folder(tmp_path / "d", per_class=3)
    (folder / "7" / "broken.png").write_bytes(b"garbage")
    transform = create_transform(**resolve_model_data_config(model), is_training=True)
    data = FolderDataset(folder, transform, [str(i) for i in range(10)], 10, max_bad_fraction=0.1)
    assert len(data) == 30 and data.skipped == [str(folder / "7" / "broken.png")]
    assert [y for _, y in data.samples] == [i for i in range(10) for _ in range(3)]
    x, y = data[0]
    assert x.shape == (3, 32, 32) and y == 0
    with pytest.raises(DataError, match="1 of 31 images"):
        FolderDataset(folder, transform, None, 10, max_bad_fraction=0.01)


def test_folder_run_with_a_reheaded_model(tmp_path: Path) -> None:
    """Folder names that are not the model's classes train with --num-classes (distillation off)."""
    folder = _digit_folder(tmp_path / "pets", per_class=8, classes=["cat", "dog", "emu"])
    out = tmp_path / "ft"
    assert (
        main(
            [
                "digits_vit",
                *QUICK,
                "--epochs",
                "1",
                "--data",
                str(folder),
                "--val",
                str(folder),
                "--num-classes",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / ckpt.RECORD).read_text())
    assert record["num_classes"] == 3 and record["distill"] is False and record["data"]["train_images"] == 24

    # The re-headed weights export: the model takes its head from them, ONNX Runtime gives 3 logits
    # equal to the fine-tuned PyTorch model's.
    exported = tmp_path / "exported"
    argv = ["digits_vit", "--weights", str(out / ckpt.WEIGHTS), "--keep", "0.7", "--layers", "0,2,4"]
    assert export_main([*argv, "--no-latency", "--val-limit", "64", "--out", str(exported)]) == 0
    assert json.loads((exported / "report.json").read_text())["model"]["num_classes"] == 3
    tuned = colln.prune(colln.load_model("digits_vit"), colln.PruneConfig(keep=0.7, layers=(0, 2, 4)))
    tuned.reset_classifier(3)
    tuned.load_state_dict(ckpt.load_state(out / ckpt.CHECKPOINT)["model"])
    x = preprocess(bundled.load_split("test").images[:8], tuned)
    logits = ort.InferenceSession(str(exported / "model.onnx")).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, tuned.eval()(x).numpy(), rtol=1e-4, atol=1e-4)


def test_reheaded_class_names_go_with_the_weights(tmp_path: Path) -> None:
    """--num-classes 2 on folders 3/ 7/ maps 3 -> 0 and 7 -> 1; the weights carry those names, so
    colln-eval on the same folders labels them the same way (checked against the model's own
    predictions, computed here)."""
    from colln.app.eval_cli import main as eval_main
    from colln.models.registry import stored_class_names

    folder = _digit_folder(tmp_path / "d", per_class=12, classes=["3", "7"])
    out = tmp_path / "ft"
    argv = ["digits_vit", *QUICK, "--epochs", "2", "--data", str(folder), "--val", str(folder), "--num-classes", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    weights = out / ckpt.WEIGHTS
    assert stored_class_names(weights) == ["3", "7"]
    assert json.loads((out / ckpt.RECORD).read_text())["class_names"] == ["3", "7"]

    evaluated = tmp_path / "eval"
    argv = ["digits_vit", "--weights", str(weights), "--data", str(folder), "--keep", "0.7", "--layers", "0,2,4"]
    assert eval_main([*argv, "--metric", "colln", "--rounds", "1", "--warmup", "0", "--out", str(evaluated)]) == 0
    result = json.loads((evaluated / "results.json").read_text())
    tuned = colln.load_model("digits_vit", str(weights))
    images = [Image.open(p).convert("RGB") for name in ("3", "7") for p in sorted((folder / name).iterdir())]
    with torch.no_grad():
        pred = tuned(preprocess(images, tuned)).argmax(-1).numpy()
    labels = np.array([0] * 12 + [1] * 12)
    assert result["num_images"] == 24
    assert result["baseline"]["accuracy"] == pytest.approx(float((pred == labels).mean()))
    assert result["baseline"]["accuracy"] >= 0.75  # trained on these very images: the mapping is the one trained


# --- probe defects: --force, stop signals, undecodable images, resume identity, torchrun errors ----


def test_force_replaces_only_a_colln_run_directory(tmp_path: Path, capsys, monkeypatch) -> None:
    base = ["digits_vit", *QUICK, "--epochs", "1", "--limit", "32", "--no-distill"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ckpt.WEIGHTS).write_text("mine")
    _fails([*base, "--out", str(mine), "--force"], capsys, "output", "colln did not write it")
    assert [p.name for p in mine.iterdir()] == [ckpt.WEIGHTS] and (mine / ckpt.WEIGHTS).read_text() == "mine"

    run = tmp_path / "run"
    assert main([*base, "--out", str(run)]) == 0
    first = (run / ckpt.WEIGHTS).read_bytes()
    (run / ckpt.WEIGHTS).write_bytes(b"stale")
    assert main([*base, "--out", str(run), "--force"]) == 0  # colln's own run directory: started over
    assert (run / ckpt.WEIGHTS).read_bytes() == first and json.loads((run / ckpt.RECORD).read_text())["complete"]

    monkeypatch.chdir(run)
    capsys.readouterr()
    _fails([*base, "--out", ".", "--force"], capsys, "output", "current directory")
    assert (run / ckpt.WEIGHTS).read_bytes() == first


def test_an_interrupted_first_epoch_leaves_a_directory_force_may_replace(model, tmp_path: Path) -> None:
    """The run directory is colln's from the start (finetune.json, not yet complete), so --force can
    start over after a first epoch that never finished."""
    out = tmp_path / "ft"
    argv = ["digits_vit", *QUICK, "--epochs", "1", "--limit", "32", "--no-distill", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        mp.setattr("colln.jobs.finetune.finetune", interrupted)
        assert main(argv) == 130
    assert json.loads((out / ckpt.RECORD).read_text())["complete"] is False
    assert main([*argv, "--force"]) == 0


def _signalled_run(
    cmd: list[str],
    sig: signal.Signals,
    after: str,
    timeout: float,
) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith(after):
                proc.send_signal(sig)
                break
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_at_a_step_like_ctrl_c(sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    argv = ["digits_vit", *QUICK, "--epochs", "3", "--limit", "96", "--no-distill", "--out", str(out)]
    code, err = _signalled_run([sys.executable, "-m", "colln.app.finetune_cli", *argv], sig, "epoch 1/3", 120)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = ckpt.load_state(out / ckpt.CHECKPOINT)
    assert state["epoch"] == 1 and state["step"] >= 1  # mid-epoch, at a step boundary: the partial epoch is kept
    assert main([*argv, "--resume"]) == 0


def test_sigterm_under_torchrun_saves_a_mid_epoch_checkpoint(tmp_path: Path) -> None:
    """torchrun forwards SIGTERM (a scheduler's kill) to every worker: both stop at one step."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "colln.app.finetune_cli"]
    cmd += ["digits_vit", "--keep", "0.7", "--layers", "0,2,4", "--batch-size", "8", "--epochs", "2", "--limit", "256"]
    cmd += ["--no-distill", "--out", str(out)]
    _, err = _signalled_run(cmd, signal.SIGTERM, "epoch 1/2", 240)
    state = ckpt.load_state(out / ckpt.CHECKPOINT)
    assert state["epoch"] == 1 and 1 <= state["step"] < 256 // 2 // 8, (state["epoch"], state["step"], err[-2000:])
    assert len(state["rng"]) == 2


def _scrambled_png(
    source: Path,
    target: Path,
) -> None:
    """``source`` with its pixel data (IDAT) replaced by noise under valid chunk CRCs: passes
    ``PIL.Image.verify`` but does not decode."""
    import struct
    import zlib

    data, out, pos = source.read_bytes(), bytearray(source.read_bytes()[:8]), 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            body = bytes(np.random.default_rng(0).integers(0, 256, len(body), dtype=np.uint8))
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    target.write_bytes(bytes(out))


def test_an_image_that_verifies_but_does_not_decode_is_skipped_and_counted(model, tmp_path: Path) -> None:
    from PIL import Image

    folder = _digit_folder(tmp_path / "d", per_class=3)
    bad = folder / "4" / "scrambled.png"
    _scrambled_png(folder / "4" / "0.png", bad)
    with Image.open(bad) as img:
        img.verify()  # the container is sound: only decoding finds the damage
    with pytest.raises(OSError), Image.open(bad) as img:
        img.load()
    data = FolderDataset(folder, lambda img: img, [str(i) for i in range(10)], 10, max_bad_fraction=0.1)
    assert data.skipped == [str(bad)] and len(data) == 30
    assert all(data[i][0].size == (8, 8) for i in range(len(data)))  # every kept image decodes


def test_resume_refuses_other_starting_weights_or_other_data(model, train_subset, tmp_path: Path) -> None:
    pruned = colln.prune(model, **EARLY)

    def stop_after_first(record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(pruned, train_subset, epochs=2, batch_size=64, checkpoint_dir=tmp_path, on_epoch=stop_after_first)
    other_weights = colln.prune(model, **EARLY)
    with torch.no_grad():
        other_weights.head.bias.add_(1e-3)
    with pytest.raises(CheckpointError, match=r"starting weights \(--weights\) differs"):
        finetune(other_weights, train_subset, epochs=2, batch_size=64, checkpoint_dir=tmp_path, resume=True)
    same_size = Subset(train_subset.dataset, range(192, 384))
    with pytest.raises(CheckpointError, match=r"training data \(--data, --limit\) differs"):
        finetune(pruned, same_size, epochs=2, batch_size=64, checkpoint_dir=tmp_path, resume=True)
    state = ckpt.load_state(tmp_path / ckpt.CHECKPOINT)
    del state["signature"]["weights"]  # as an older colln wrote it
    ckpt.save_state(tmp_path / "old" / ckpt.CHECKPOINT, state)
    with pytest.raises(CheckpointError, match=r"does not record the starting weights .*an older colln"):
        finetune(pruned, train_subset, epochs=2, batch_size=64, checkpoint_dir=tmp_path / "old", resume=True)
    resumed = finetune(pruned, train_subset, epochs=2, batch_size=64, checkpoint_dir=tmp_path, resume=True)
    assert [h.epoch for h in resumed.history] == [1, 2]


def test_resume_refuses_a_folder_whose_files_changed(model, tmp_path: Path) -> None:
    from colln.train.datasets import data_identity

    folder = _digit_folder(tmp_path / "d", per_class=2)
    ident = data_identity(FolderDataset(folder, None, None, 10))
    assert data_identity(FolderDataset(folder, None, None, 10)) == ident
    (folder / "5" / "1.png").rename(folder / "5" / "2.png")  # same images, another file list
    assert data_identity(FolderDataset(folder, None, None, 10)) != ident
    (folder / "5" / "2.png").rename(folder / "5" / "1.png")
    assert data_identity(FolderDataset(folder, None, None, 10)) == ident
    other = (folder / "6" / "0.png").read_bytes()
    assert len(other) != (folder / "5" / "1.png").stat().st_size
    (folder / "5" / "1.png").write_bytes(other)  # same file list, another image (of another size)
    assert data_identity(FolderDataset(folder, None, None, 10)) != ident
    assert data_identity(DigitsDataset("train", model, augment=True)) == "digits (train split) (1347 items)"


def test_torchrun_prints_an_error_once_naming_the_rank(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "colln.app.finetune_cli"]
    cmd += ["digits_vit", *QUICK, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    proc = _run(cmd)
    assert proc.returncode == 1  # torchrun's code for any failed worker (the summary names each one's 2)
    lines = [line for line in proc.stderr.splitlines() if "colln: error:" in line]
    assert len(lines) == 1 and "is not a directory" in lines[0] and "of 2)" in lines[0], proc.stderr[-3000:]

"""Col-Ln + merge inside the encoder (``colln.prune(..., merge=True)``, ``colln-export --merge``):
the merge op and the merged model against plain per-image references (tests/merge_reference.py),
keep=1.0 identity, the exported graph (ONNX Runtime validation, no Scatter, TensorRT-RTX parse and
build), the tie rule for merge choices and the bad inputs. digits_vit with its bundled weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_reference import clear_images, export_error, graph_ops, plain_forward, tensorrt_builds
from png_checks import PARETO_SIZE, drawn_png
from speed_checks import assert_latency_stats

import colln
from colln.app.export_cli import main as export_main
from colln.errors import UnsupportedModelError
from colln.models import ops
from colln.models.registry import load_model
from colln.verify.validate import TOLERANCES, Reference, compare


def plain_merge(x, keys, kept, weights, sizes):
    """One image: each candidate not in ``kept`` joins the kept token of most similar key."""
    unit = keys / keys.norm(dim=-1, keepdim=True)
    rows, out_sizes = [], []
    for c in kept:
        group = [c] + [j for j in range(len(x)) if j not in kept and max(kept, key=lambda t: float(unit[j] @ unit[t])) == c]
        rows.append(sum(weights[g] * x[g] for g in group) / sum(weights[g] for g in group))
        out_sizes.append(sum(float(sizes[g]) for g in group))
    return torch.stack(rows), torch.tensor(out_sizes)


def test_merge_tokens_matches_a_plain_loop_with_sizes() -> None:
    torch.manual_seed(0)
    x, keys = torch.randn(3, 20, 6), torch.randn(3, 20, 4)
    indices = torch.stack([torch.randperm(20)[:7] for _ in range(3)])
    sizes = torch.randint(1, 5, (3, 20)).float()
    weights = sizes * torch.rand(3, 20)
    merged, out_sizes = ops.merge_tokens(x, keys, indices, weights, sizes)
    for b in range(3):
        want, want_sizes = plain_merge(x[b], keys[b], indices[b].tolist(), weights[b], sizes[b])
        torch.testing.assert_close(merged[b], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_sizes[b], want_sizes)
    torch.testing.assert_close(out_sizes.sum(-1), sizes.sum(-1))


@pytest.mark.parametrize(("weight", "prop_attn"), [("size", True), ("score", True), ("size", False)])
def test_merged_model_matches_a_plain_per_image_forward(
    trained_digits_vit, digits_test_images, weight: str, prop_attn: bool
) -> None:
    merged = colln.prune(trained_digits_vit, keep=0.5, layers=(1, 3, 5), merge=True, merge_weight=weight, prop_attn=prop_attn)
    plan = colln.get_plan(merged)
    with torch.no_grad(), colln.record_selections(merged) as selections:
        logits = merged(digits_test_images)
    clear = clear_images(selections, len(digits_test_images))
    assert clear.sum() >= 8
    for b in np.flatnonzero(clear):
        want = plain_forward(
            trained_digits_vit, digits_test_images[b], merge=dict(plan.pruned_layers), weight=weight, prop_attn=prop_attn
        )
        torch.testing.assert_close(logits[b], want, atol=2e-4, rtol=1e-4)


def test_merge_keeps_the_pruned_selection_at_the_first_layer(trained_digits_vit, digits_test_images) -> None:
    """Merging changes what later blocks see, not what the first pruning layer picks."""
    recorded = []
    for model in (colln.prune(trained_digits_vit, keep=0.5, merge=True), colln.prune(trained_digits_vit, keep=0.5)):
        with torch.no_grad(), colln.record_selections(model) as selections:
            model(digits_test_images)
        recorded.append(selections)
    assert len(recorded[0]) == len(recorded[1]) == 3
    assert torch.equal(recorded[0][0].indices, recorded[1][0].indices)
    assert not torch.equal(recorded[0][1].indices, recorded[1][1].indices)


def test_keep_one_is_exactly_the_unpruned_model(trained_digits_vit, digits_test_images) -> None:
    with torch.no_grad():
        assert torch.equal(
            colln.prune(trained_digits_vit, keep=1.0, merge=True)(digits_test_images), trained_digits_vit(digits_test_images)
        )
    assert "merged into the kept tokens by size" in str(colln.plan_for(trained_digits_vit, keep=0.5, merge=True))


def _reference(n: int, margins: np.ndarray) -> Reference:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, 10)).astype(np.float32) * 5
    scores = np.tile(np.linspace(1.0, 0.1, 8, dtype=np.float32), (n, 1))
    kept = np.tile(np.arange(4), (n, 1))
    return Reference(outputs=logits, unpruned=logits, kept={2: kept}, scores={2: scores}, merge_margins={2: margins})


def test_tie_rule_excludes_near_tied_merge_choices_only() -> None:
    # Six images ten times over: a pass needs at least 30 judged (colln.verify.validate.required_judged).
    n = 60
    margins = np.tile(np.array([0.3, 5e-5, 0.2, 0.1, 0.0, 0.4], dtype=np.float32), 10)
    ref = _reference(n, margins)
    cand = ref.outputs.copy()
    cand[1::6] += 3.0  # images 1 and 4 of each six: a near-tied destination may legitimately differ
    cand[4::6] -= 2.0
    args = dict(metric="colln", fuse=False, tolerances=TOLERANCES["fp32"], labels=None, backend="ort", precision="fp32")
    report = compare(ref, cand, {2: ref.kept[2]}, [(2, 4)], source="test", **args)
    assert report.passed and report.judged_images == 40
    assert report.layers[0].merge_tied_images == 20 and report.layers[0].min_merge_margin == 0.0
    assert any("near-tied merge choice" in w for w in report.warnings)
    cand[3] += 1.0  # a clear merge margin: the difference is a mismatch
    failed = compare(ref, cand, {2: ref.kept[2]}, [(2, 4)], source="test", **args)
    assert not failed.passed and all("worst: image 3" in m for m in failed.mismatches)


@pytest.fixture(scope="module")
def merge_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "merge07"
    assert export_main(["digits_vit", "--keep", "0.7", "--merge", "--out", str(out), "--no-latency", "--val-limit", "96"]) == 0
    return out


def test_export_validates_in_onnxruntime_with_observed_kept_sets(merge_export: Path) -> None:
    report = json.loads((merge_export / "report.json").read_text())
    v = report["validation"]
    assert v["passed"] and v["kept_sets_observed"] and v["judged_images"] > 48
    assert report["plan"]["merge"] and report["plan"]["keep_counts"] == [45, 32, 23]
    assert all(layer["identical_fraction"] == 1.0 and layer["min_merge_margin"] > 0 for layer in v["layers"])


def test_graph_has_no_scatter(merge_export: Path) -> None:
    ops_used = graph_ops(merge_export)
    assert ops_used["TopK"] == 3 and ops_used["ArgMax"] == 3  # one selection and one nearest-kept choice per layer


def test_tensorrt_parses_and_builds_the_merged_graph(merge_export: Path, tmp_path: Path) -> None:
    assert tensorrt_builds(merge_export, tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge", "--fuse"], "plan: --merge and --fuse both keep the pruned tokens' content"),
        (["--merge", "--precision", "fp16"], "arguments: --merge needs --precision fp32"),
        (["--merge", "--merge-weight", "mean"], "arguments: argument --merge-weight: invalid choice"),
        (["--merge", "--keep", "0"], "plan: keep rate 0.0 is outside (0, 1]"),
    ],
)
def test_bad_merge_inputs_exit_2_in_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert export_error(args, tmp_path, capsys).startswith(f"colln: error: {message}")


def test_merge_needs_attention_keys(trained_digits_vit) -> None:
    """A block whose attention is not timm's has no keys colln can compare: refused in one line."""
    odd = load_model("digits_vit", "bundled")
    odd.blocks[4].attn = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="block 4 uses Identity"):
        colln.prune(odd, keep=0.5, layers=(2,), merge=True)
    with pytest.raises(UnsupportedModelError, match="block 4 uses Identity"):
        colln.tome(odd, 4)


def test_eval_compares_prune_merge_and_tome_in_one_interleaved_run(trained_digits_vit, tmp_path: Path) -> None:
    from colln.data import load_labelled, preprocess
    from colln.export.spec import ExportSpec
    from colln.infer.timing import Timing
    from colln.measure.sweep import SweepOptions, export_command

    options = SweepOptions(
        keeps=(0.5,),
        layers=((1, 3),),
        metrics=("colln",),
        methods=("prune", "merge", "tome"),
        tome_rs=(8, 12),
        timing=Timing(rounds=2, warmup=0),
    )
    result = colln.evaluate(
        ExportSpec("digits_vit", weights="bundled"), options, out=tmp_path / "ev", limit=60, target_speedup=0.01
    )
    rows = {r.key: r for r in result.sweep.rows}
    assert sorted(rows) == ["colln-n4-keep0.5-L1.3", "colln-n4-keep0.5-L1.3-merge", "tome-r12", "tome-r8"]
    data = load_labelled("digits", trained_digits_vit, limit=60)
    x, y = preprocess(data.images, trained_digits_vit), torch.from_numpy(data.labels)
    expected = {
        "colln-n4-keep0.5-L1.3": colln.prune(trained_digits_vit, keep=0.5, layers=(1, 3)),
        "colln-n4-keep0.5-L1.3-merge": colln.prune(trained_digits_vit, keep=0.5, layers=(1, 3), merge=True),
        "tome-r8": colln.tome(trained_digits_vit, 8),
        "tome-r12": colln.tome(trained_digits_vit, 12),
    }
    for key, model in expected.items():
        with torch.no_grad():
            assert rows[key].accuracy == pytest.approx(float((model(x).argmax(-1) == y).float().mean())), key
        assert_latency_stats(rows[key].latency.to_dict(), batch=1, rounds=2)  # timed in the same run
    best = max(result.sweep.rows, key=lambda r: (r.accuracy, -r.latency.p50_ms))
    assert result.sweep.pick["key"] == best.key  # the budget picks across methods
    assert export_command(rows["tome-r8"], ExportSpec("digits_vit")) == "colln-export digits_vit --tome 8"
    assert export_command(rows["colln-n4-keep0.5-L1.3-merge"], ExportSpec("digits_vit")).endswith("--merge")
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "| Col-Ln + merge |" in md and "## ToMe at every block" in md and "r=12" in md
    drawn_png(tmp_path / "ev" / "accuracy_vs_latency.png", PARETO_SIZE)


def test_eval_refuses_an_unknown_method(tmp_path: Path, capsys) -> None:
    from colln.app.eval_cli import main as eval_main

    assert eval_main(["digits_vit", "--method", "prune,drop", "--out", str(tmp_path / "ev")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("colln: error:")]
    assert len(errors) == 1 and "unknown method drop: choose from prune,merge,tome" in errors[0], errors


def test_eval_refuses_tome_r_without_the_tome_method(tmp_path: Path, capsys) -> None:
    """--tome does nothing unless ToMe is swept: refused in one line, nothing written."""
    from colln.app.eval_cli import main as eval_main

    out = tmp_path / "ev"
    assert eval_main(["digits_vit", "--method", "prune", "--tome", "8", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("colln: error:")]
    assert len(errors) == 1 and "--tome sets ToMe's r values and does nothing without --method tome" in errors[0], errors
    assert not out.exists()


def test_eval_under_torchrun_gives_the_accuracies_of_one_process(tmp_path: Path) -> None:
    """Two gloo processes each score every other image; the counts are summed and rank 0 alone
    times and writes: the same accuracies and agreements as one process, an odd image count included."""
    import os
    import subprocess
    import sys

    args = ["digits_vit", "--method", "prune,merge,tome", "--metric", "colln", "--keep", "0.5", "--layers", "1,3"]
    args += ["--tome", "8", "--limit", "61", "--rounds", "2", "--warmup", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "colln.app.eval_cli"]
    proc = subprocess.run(
        [*cmd, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1
    one = subprocess.run(
        [sys.executable, "-m", "colln.app.eval_cli", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert [r["num_images"] for r in results] == [61, 61]
    for key in ("accuracy", "agreement"):
        assert [row[key] for row in results[0]["rows"]] == [row[key] for row in results[1]["rows"]]
        assert results[0]["baseline"][key] == results[1]["baseline"][key]
    for row in results[1]["rows"]:
        assert_latency_stats(row["latency"], batch=1, rounds=2)

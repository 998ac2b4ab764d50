"""Batches split into one slice per thread (SplitBatchOnnxrtRunner): the same outputs as one
session over the whole batch, only for batches of at least one image per thread, never for a graph
whose outputs are not batch-major, and switchable from colln-bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from polygraphy.backend.onnxrt import OnnxrtRunner

from colln.app.bench_cli import main as bench_main
from colln.data import validation_images
from colln.export.spec import INPUT_NAME, ExportSpec
from colln.infer.runners import SplitBatchOnnxrtRunner, onnxruntime_runner, open_runner


@pytest.mark.parametrize("record_kept", [False, True], ids=["logits", "logits+kept-tokens"])
def test_slices_give_the_outputs_of_one_session(digits_export: Path, record_kept: bool) -> None:
    images = validation_images("digits_vit", ExportSpec.read(digits_export).load_pruned(), limit=7).images
    split = open_runner(digits_export, threads=2, record_kept=record_kept)
    whole = open_runner(digits_export, threads=2, record_kept=record_kept, split_batches=False)
    assert isinstance(split, SplitBatchOnnxrtRunner) and not isinstance(whole, SplitBatchOnnxrtRunner)
    with split, whole:
        for batch in (1, 2, 3, 7):  # 3 and 7: unequal slices
            feed = {INPUT_NAME: images[:batch]}
            got, want = split.infer(feed), whole.infer(feed)
            assert list(got) == list(want) and len(got) == (4 if record_kept else 1)  # logits (+ 3 pruning layers)
            for name in want:
                assert got[name].shape == want[name].shape and np.array_equal(got[name], want[name]), (batch, name)
            # A single image runs on the threaded session; from 2 images on, the single-thread one is made and used.
            assert (split._single is not None) == (batch >= 2)


def test_one_thread_never_splits(digits_export: Path) -> None:
    runner = open_runner(digits_export, threads=1)
    assert type(runner) is OnnxrtRunner


def test_a_graph_whose_output_is_not_batch_major_is_run_whole(tmp_path: Path) -> None:
    # Sum over the batch: slices would return per-slice sums stacked, not the sum.
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "batch_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
    )
    path = tmp_path / "batch_sum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    with onnxruntime_runner(path, threads=2) as runner:
        assert isinstance(runner, SplitBatchOnnxrtRunner)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], x.sum(axis=0, keepdims=True))
        assert runner._single is None


def test_colln_bench_records_and_switches_the_split(digits_export: Path, tmp_path: Path) -> None:
    reports = {}
    for flag in ([], ["--no-split-batches"]):
        out = tmp_path / f"bench{len(flag)}.json"
        argv = [str(digits_export), "--threads", "2", "--batch", "2", "--rounds", "2", "--warmup", "0", *flag]
        assert bench_main([*argv, "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
        reports[bool(flag)] = json.loads(out.read_text())
    assert reports[False]["split_batches"] is True and reports[True]["split_batches"] is False

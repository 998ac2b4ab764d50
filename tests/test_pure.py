"""Unit tests of small pure functions, each against expectations worked out by hand: the folder
label rule, configuration names and flags, the feature layer, OpenVINO's reported precision, the
stale-file sweep, the health probe's request and the integer-list parser."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colln.app.cli import parse_ints
from colln.data import digits_fit, label_map, pick, read_images, top1_accuracy, top1_correct
from colln.errors import DataError, PlanError, UsageError
from colln.export.artifact import default_out_dir
from colln.export.spec import ExportSpec
from colln.files import remove_stale
from colln.measure.bench import case_name
from colln.models.config import PruneConfig, config_flags, config_name
from colln.models.plan import resolve_feature_layer

ROOT = Path("/data/set")

# --- colln.data.label_map -------------------------------------------------------------------------


def test_label_map_by_class_name_takes_the_first_index_of_a_repeated_name() -> None:
    names = ["cat", "dog", "cat", "fish"]
    assert label_map(ROOT, ["dog", "cat"], names, 4) == {"dog": 1, "cat": 0}  # any subset, in any order


def test_label_map_by_index_when_the_names_are_not_integers() -> None:
    assert label_map(ROOT, ["0", "7", "9"], ["a"] * 10, 10) == {"0": 0, "7": 7, "9": 9}
    assert label_map(ROOT, ["3", "12"], None, 13) == {"3": 3, "12": 12}  # a partial set of indices, no names
    with pytest.raises(DataError, match=r"class folder 10/ of /data/set is beyond the model's 10 classes"):
        label_map(ROOT, ["2", "10"], None, 10)


def test_label_map_integer_class_names_match_by_name_only() -> None:
    # A head re-made for digits "3" and "7": folder 3 is output 0, not output 3.
    assert label_map(ROOT, ["3", "7"], ["3", "7"], 2) == {"3": 0, "7": 1}
    with pytest.raises(DataError, match=r"class folders 0/ of /data/set are not classes of the model") as err:
        label_map(ROOT, ["0", "3"], ["3", "7"], 2)
    assert "class indices" not in str(err.value)  # indices are no way out when names are integers


def test_label_map_by_sorted_position_only_with_as_many_folders_as_outputs() -> None:
    assert label_map(ROOT, ["ants", "bees"], None, 2) == {"ants": 0, "bees": 1}
    with pytest.raises(DataError, match=r"has 2 class folders \(ants/, bees/\) .* the model has 3 classes"):
        label_map(ROOT, ["ants", "bees"], None, 3)
    # Names known to the model but some folders not: refused, not positional.
    with pytest.raises(DataError, match=r"class folders bees/ of /data/set are not classes of the model"):
        label_map(ROOT, ["ants", "bees"], ["ants", "wasps"], 2)


# --- colln.data.pick: the one meaning of an image limit ------------------------------------------


def test_pick_spreads_the_limit_evenly_over_the_set() -> None:
    assert pick(10, 4).tolist() == [0, 3, 6, 9]  # first and last included, evenly spaced
    assert pick(8, 2).tolist() == [0, 7]
    assert pick(7, 1).tolist() == [0]
    # a set listed class by class (3 classes of 4): every class keeps its share, not the first N
    classes = np.repeat([0, 1, 2], 4)
    assert sorted(classes[pick(12, 3)].tolist()) == [0, 1, 2]
    assert pick(5, None).tolist() == pick(5, 5).tolist() == pick(5, 9).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UsageError, match=r"--val-limit must be >= 1, got 0"):
        pick(5, 0, "--val-limit")


# --- colln.data.digits_fit: one rule for 'digits', whatever reads it ----------------------------


def _head(architecture: str, num_classes: int) -> torch.nn.Module:
    """A stand-in model: all the rule reads is the architecture and the head's size."""
    model = torch.nn.Identity()
    model.pretrained_cfg, model.num_classes = {"architecture": architecture}, num_classes
    return model


def test_digits_fit_takes_digits_models_and_says_whether_their_labels_fit() -> None:
    assert digits_fit(_head("digits_vit", 10), labelled=True) and digits_fit(_head("digits_eva", 10), labelled=False)
    assert digits_fit(_head("digits_vit", 2), labelled=False) is False  # re-headed: the images, without labels
    with pytest.raises(DataError, match="'digits' has 10 classes but the model has 2"):
        digits_fit(_head("digits_vit", 2), labelled=True)
    for labelled in (True, False):
        with pytest.raises(DataError, match="only fits the digits models"):
            digits_fit(_head("deit_small_patch16_224", 1000), labelled=labelled)


def test_read_images_and_training_data_refuse_digits_for_another_model_alike() -> None:
    """colln-eval / colln-validate (read_images) and colln-finetune (open_dataset) apply the same rule:
    an ImageNet model is not given the digits with their labels read as ImageNet classes."""
    from colln.train.datasets import open_dataset

    imagenet = _head("deit_small_patch16_224", 1000)
    for read in (lambda: read_images("digits", imagenet, labelled=True), lambda: open_dataset("digits", imagenet, training=True)):
        with pytest.raises(DataError, match="only fits the digits models"):
            read()


# --- colln.data.top1_correct / top1_accuracy ------------------------------------------------------


def test_top1_counts_rows_whose_largest_score_is_the_label() -> None:
    scores = np.array([[0.1, 0.9, 0.0], [2.0, -1.0, 1.5], [0.0, 0.2, 0.3], [5.0, 4.0, 6.0]], dtype=np.float32)
    labels = np.array([1, 2, 2, 0])  # right, wrong (0 is largest), right, wrong (2 is largest)
    assert top1_correct(scores, labels) == 2
    assert top1_accuracy(scores, labels) == 0.5
    # torch tensors give the same count, as a plain int / float
    assert top1_correct(torch.from_numpy(scores), torch.from_numpy(labels)) == 2
    assert top1_accuracy(torch.from_numpy(scores), torch.from_numpy(labels)) == 0.5
    assert top1_accuracy(scores[:1], labels[:1]) == 1.0 and top1_accuracy(scores[1:2], labels[1:2]) == 0.0
    with pytest.raises(DataError, match="no images to score"):
        top1_accuracy(scores[:0], labels[:0])


# --- colln.models.config.config_flags ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "flags"),
    [
        (PruneConfig(keep=0.7, layers=(3, 6, 9)), "--keep 0.7 --layers 3,6,9 --metric colln --norm 4"),
        (PruneConfig(keep=(0.7, 0.5), layers=(1, 2), metric="cls"), "--keep 0.7,0.5 --layers 1,2 --metric cls"),
        (
            PruneConfig(keep=0.5, layers=(2,), metric="correct", rescue=0.3, fuse=True, spatial_order=True, round_to=8),
            "--keep 0.5 --layers 2 --metric correct --norm 4 --rescue 0.3 --fuse --spatial-order --round-to 8",
        ),
        (PruneConfig(keep=0.7, layers=(4,), norm=2.5), "--keep 0.7 --layers 4 --metric colln --norm 2.5"),
        (
            PruneConfig(keep=0.7, layers=(3,), merge=True, merge_weight="size", prop_attn=False),
            "--keep 0.7 --layers 3 --metric colln --norm 4 --merge --merge-weight size --no-prop-attn",
        ),
        (PruneConfig(keep=0.7, layers=(3,), merge=True), "--keep 0.7 --layers 3 --metric colln --norm 4 --merge"),
        (PruneConfig(keep=1.0, tome=(8, 4), layers=(0, 1), prop_attn=False), "--tome 8,4 --layers 0,1 --no-prop-attn"),
        (PruneConfig(keep=1.0, tome=8, layers=(0, 1, 2)), "--tome 8 --layers 0,1,2"),
    ],
)
def test_config_flags(config: PruneConfig, flags: str) -> None:
    assert shlex.join(config_flags(config)) == flags


def test_config_flags_leave_out_defaults_and_settings_the_metric_does_not_read() -> None:
    # layers None is the default layers; [CLS] reads no norm; rescue at its default is not written
    assert config_flags(PruneConfig(keep=0.5, metric="correct")) == ["--keep", "0.5", "--metric", "correct", "--norm", "4"]
    assert config_flags(PruneConfig(keep=0.5, metric="cls", norm=2.0, rescue=0.3)) == ["--keep", "0.5", "--metric", "cls"]
    assert config_flags(PruneConfig(keep=1.0, tome=8)) == ["--tome", "8"]
    tokens = PruneConfig(keep=(0.7, 0.3333), layers=(2,), output="tokens", feature_layer=-1, order="score")
    assert shlex.join(config_flags(tokens)) == (
        "--keep 0.7,0.3333 --layers 2 --metric colln --norm 4 --output tokens --feature-layer -1 --order score"
    )


@pytest.mark.parametrize(
    ("config", "precision", "name", "detail"),
    [
        (PruneConfig(), "fp32", "colln-keep0.7", "colln-n4-keep0.7-L"),
        (
            PruneConfig(keep=0.5, layers=(1, 3), norm=2.0, merge=True),
            "int8",
            "colln-keep0.5-merge-int8",
            "colln-n2-keep0.5-L1.3-merge-int8",
        ),
        (
            PruneConfig(keep=(0.7, 0.5), metric="cls", output="tokens"),
            "fp16",
            "cls-tokens-keep0.7-0.5-fp16",
            "cls-tokens-n4-keep0.7-0.5-L-fp16",
        ),
        (PruneConfig(keep=1.0, tome=8), "fp32", "tome8", "tome-r8"),
        (PruneConfig(keep=1.0, tome=(8, 4)), "int8", "tome8-4-int8", "tome-r8-4-int8"),
    ],
)
def test_config_name(config: PruneConfig, precision: str, name: str, detail: str) -> None:
    assert config_name(config, precision) == name
    assert config_name(config, precision, detail=True) == detail


# --- colln.export.artifact.default_out_dir and colln.measure.bench.case_name ----------------------


@pytest.mark.parametrize(
    ("spec", "directory", "case"),
    [
        (ExportSpec("vit_base"), "vit_base-colln-keep0.7", "vit_base-colln-keep0.7@onnxruntime-t0"),
        (
            ExportSpec("deit_small", pruning=PruneConfig(keep=(0.7, 0.5), layers=(3, 6)), precision="int8"),
            "deit_small-colln-keep0.7-0.5-int8",
            "deit_small-colln-keep0.7-0.5-int8-L3,6@onnxruntime-t0",
        ),
        (ExportSpec("m", pruning=PruneConfig(keep=1.0, tome=(8, 4))), "m-tome8-4", "m-tome8-4@onnxruntime-t0"),
        (
            ExportSpec("m", pruning=PruneConfig(keep=1.0, tome=12), precision="fp16"),
            "m-tome12-fp16",
            "m-tome12-fp16@onnxruntime-t0",
        ),
        (
            ExportSpec("m", pruning=PruneConfig(keep=0.5, output="tokens", merge=True), precision="fp16"),
            "m-colln-tokens-keep0.5-merge-fp16",
            "m-colln-tokens-keep0.5-merge-fp16@onnxruntime-t0",
        ),
        (
            ExportSpec("m", pruning=PruneConfig(keep=0.25, metric="cls", round_to=8, layers=(3,))),
            "m-cls-keep0.25",
            "m-cls-keep0.25-L3-r8@onnxruntime-t0",
        ),
        (ExportSpec("m", pruning=PruneConfig(keep=1.0)), "m-colln-keep1", "m-colln-keep1@onnxruntime-t0"),
    ],
)
def test_default_out_dir_and_case_name(spec: ExportSpec, directory: str, case: str) -> None:
    assert default_out_dir(spec) == Path("exports") / directory
    assert default_out_dir(spec, root=Path("/tmp/x")) == Path("/tmp/x") / directory
    assert case_name(spec, "onnxruntime", None) == case
    assert case_name(spec, "onnxruntime", 0) == case  # None and 0 both mean the runtime's default
    where = case.partition("@")[0]
    assert case_name(spec, "torch", 2, "cuda:1") == f"{where}@torch-t2-cuda:1"
    assert case_name(spec, "openvino", 4, "cpu") == f"{where}@openvino-t4"


def test_export_json_keeps_the_plan_under_plan() -> None:
    """ExportSpec.plan_record is written and read as export.json's documented ``plan`` key (docs/vlm.md:
    ``plan.final_k``), in the place it always had: an export written before the rename reads the same."""
    record = {"final_k": 16, "layers": [3]}
    data = ExportSpec("m", plan_record=record).to_dict()
    assert list(data) == ["model", "weights", "img_size", "pruning", "precision", "opset", "plan", "weights_sha256", "artifacts"]
    assert data["plan"] == record
    older = {"model": "m", "pruning": PruneConfig().to_dict(), "plan": record, "artifacts": {}}
    assert ExportSpec.from_dict(older).plan_record == record
    assert ExportSpec.from_dict(json.loads(json.dumps(data))).plan_record == record


# --- colln.models.plan.resolve_feature_layer ------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "depth", "index"),
    [(None, 12, 10), (None, 2, 0), (-1, 12, 11), (-12, 12, 0), (0, 12, 0), (11, 12, 11), (5, 8, 5), (-3, 8, 5)],
)
def test_resolve_feature_layer(layer: int | None, depth: int, index: int) -> None:
    assert resolve_feature_layer(layer, depth) == index


@pytest.mark.parametrize(("layer", "depth"), [(12, 12), (-13, 12), (None, 1), (0, 0)])
def test_resolve_feature_layer_refuses_a_block_the_model_lacks(layer: int | None, depth: int) -> None:
    with pytest.raises(PlanError, match="out of range"):
        resolve_feature_layer(layer, depth)


# --- colln.export.openvino.used_precision ---------------------------------------------------------


class _Compiled:
    """What ``used_precision`` reads of a compiled model: its inference-precision property."""

    def __init__(
        self,
        value: object,
    ) -> None:
        self.value = value

    def get_property(
        self,
        name: str,
    ) -> object:
        assert name == "INFERENCE_PRECISION_HINT"
        return self.value


def test_used_precision_names_openvino_types_as_colln_does() -> None:
    ov = pytest.importorskip("openvino")
    from colln.export.openvino import used_precision

    # OpenVINO's own element types, as the CPU plugin returns them (str: "<Type: 'bfloat16'>").
    assert used_precision(_Compiled(ov.Type.f32)) == "fp32"
    assert used_precision(_Compiled(ov.Type.bf16)) == "bf16"
    assert used_precision(_Compiled(ov.Type.f16)) == "fp16"
    assert used_precision(_Compiled("f32")) == "fp32"  # a bare short name
    assert used_precision(_Compiled(ov.Type.i8)) == "int8_t"  # no colln name: OpenVINO's own, unchanged


# --- colln.files.remove_stale ---------------------------------------------------------------------


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_removes_only_leftovers_of_dead_processes(tmp_path: Path) -> None:
    dead, mine, alive = _dead_pid(), os.getpid(), os.getppid()
    names = [
        f".model.onnx.tmp-{dead}-abc",  # gone: removed
        f".model.onnx.old-{dead}",  # gone: removed
        f".model.onnx.tmp-{mine}-abc",  # this process: kept
        f".model.onnx.tmp-{alive}-abc",  # alive: kept
        ".model.onnx.tmp-notapid-abc",  # not a pid: kept
        f".model.onnx.bak-{dead}",  # another kind: kept
        f".other.tmp-{dead}",  # another name: kept
        f"model.onnx.tmp-{dead}",  # not hidden: kept
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    stale_dir = tmp_path / f".model.onnx.tmp-{dead}-dir"  # a directory of a dead process: removed whole
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "f").write_text("x")
    remove_stale(tmp_path, "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


# --- colln.serve.supervisor.probe_request ---------------------------------------------------------


def test_probe_request_is_a_binary_request_of_zeros_at_batch_one() -> None:
    pytest.importorskip("aiohttp")
    from colln.serve.guard import ModelLimits
    from colln.serve.supervisor import probe_request

    limits = ModelLimits(name="m", max_batch=8, inputs={"images": ("FP32", (3, 4, 5)), "ids": ("INT64", (7,))})
    body, headers = probe_request(limits)
    length = int(headers["Inference-Header-Content-Length"])
    assert headers["Content-Type"] == "application/octet-stream"
    header = json.loads(body[:length])
    assert header == {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": [1, 3, 4, 5], "parameters": {"binary_data_size": 240}},
            {"name": "ids", "datatype": "INT64", "shape": [1, 7], "parameters": {"binary_data_size": 56}},
        ]
    }
    assert body[length:] == bytes(240 + 56)  # 1*3*4*5 floats of 4 bytes, then 7 int64 zeros
    # A model without a batch axis (max_batch_size 0) takes its dims as they are.
    body, headers = probe_request(ModelLimits(name="n", max_batch=0, inputs={"x": ("FP16", (2, 3))}))
    length = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:length])["inputs"][0]["shape"] == [2, 3] and body[length:] == bytes(12)


# --- colln.app.cli.parse_ints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values"),
    [("3,6,9", (3, 6, 9)), ("7", (7,)), (" 3, 6 ", (3, 6)), ("3,,6,", (3, 6)), ("-1,0", (-1, 0)), ("9,3,3", (9, 3, 3))],
)
def test_parse_ints(text: str, values: tuple[int, ...]) -> None:
    assert parse_ints(text, "--layers") == values


@pytest.mark.parametrize(
    ("text", "minimum", "message"),
    [
        ("", None, "--layers is empty"),
        (",", None, "--layers is empty"),
        ("3,x", None, "--layers must be comma-separated integers like 3,6,9, got '3,x'"),
        ("1.5", None, "comma-separated integers"),
        ("3,0", 1, "--layers must be integers >= 1, got '3,0'"),
        ("-1", 0, "integers >= 0"),
    ],
)
def test_parse_ints_refuses(text: str, minimum: int | None, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_ints(text, "--layers", minimum)
    assert parse_ints("1", "--layers", minimum=1) == (1,)  # the minimum itself passes


# --- colln.infer.environment.cpu_flags ------------------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    from colln.infer.environment import CPU_FLAGS, cpu_flags, describe_cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text(X86_CPUINFO)
    flags = cpu_flags(info)
    assert list(flags) == list(CPU_FLAGS)
    assert [name for name, present in flags.items() if present] == [
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    ]
    assert describe_cpu_flags(flags) == "flags avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16 (no avx512_fp16)"
    info.write_text(X86_CPUINFO.replace("avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni", "avx512_vnni_x"))
    assert not any(cpu_flags(info).values())  # whole words only
    assert describe_cpu_flags(cpu_flags(info)) == "flags none of " + " ".join(CPU_FLAGS)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # arm64 names its flags otherwise
    assert cpu_flags(info) is None
    assert cpu_flags(tmp_path / "absent") is None  # not Linux
    assert describe_cpu_flags(None) == "flags not recorded"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_cpu_flags_of_this_machine_match_proc_cpuinfo() -> None:
    import re

    from colln.infer.environment import CPU_FLAGS, cpu_flags, environment

    found = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    expected = {name: f" {name} " in f" {found.group(1).strip()} " for name in CPU_FLAGS} if found else None
    assert cpu_flags() == expected
    assert environment("onnxruntime", 1)["cpu_flags"] == expected

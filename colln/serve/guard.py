"""The guard in front of Triton: colln-serve's public HTTP and gRPC ports.

Triton 2.51 (the server PyTriton 0.7 bundles, and the 24.10 GPU image) reserves and zero-fills the
byte size an HTTP JSON request *declares* before it compares it with the data sent or the model's
max batch: one 63 KB request declaring ``[100000, 3, 224, 224]`` costs 1.2 GB, a few million rows
abort the server with ``std::bad_alloc``. It also answers several client mistakes with 500 (data
length vs shape, negative dims, invalid JSON, binary header-length mismatches, a JSON batch above
the maximum), which clients retry. Triton 2.51 has no option that bounds this (``--http-max-input-size``
came later and bounds the body, not the declared shape), so every request is checked here, against
the model configs Triton itself reports, before a byte of it reaches Triton:

- the inputs named are the model's, with its datatype and dims, a batch in ``1..max_batch_size``;
- the data sent (JSON values, binary tensor bytes, gRPC raw or typed contents) is exactly the size
  the shape declares, and the body is no larger than the largest valid request;
- only health, metadata, config, statistics, inference and the repository index are passed on:
  shared-memory, model load/unload, logging and trace endpoints are refused (403 /
  PERMISSION_DENIED): they act on the server host, not on one request.

A request that fails a check gets 400 (INVALID_ARGUMENT on gRPC) with one line; everything else is
forwarded unchanged to Triton on private loopback ports. Readiness (``/v2/health/ready``, model
ready, gRPC ServerReady/ModelReady) is the supervisor's verdict (:mod:`colln.serve.server`): a real
inference per model, not only Triton's word.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Triton datatype -> bytes per element (BYTES has no fixed size and is not served by colln models).
DTYPE_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
}
# gRPC typed contents field per datatype (InferTensorContents).
GRPC_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# A JSON number costs at most this many characters on the wire ("-1.2345678e-05, ").
JSON_CHARS_PER_VALUE = 24
# Room for the request's JSON header beyond the tensor data.
HEADER_ALLOWANCE = 64 * 1024
# Paths and gRPC methods that act on the server host rather than run one request.
# The HTTP endpoints passed on (an allowlist): health, metadata, config, statistics, inference and
# the repository index (read-only; the Docker healthcheck reads it). Shared memory, model
# load/unload, logging and trace settings act on the server host and are refused.
ALLOWED_PATHS = re.compile(
    r"^/v2(/health/(live|ready)|/repository/index|/models/stats|/models/[^/]+(/versions/[^/]+)?(/(ready|config|stats|infer))?)?$"
)
REFUSED_METHODS = (
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "RepositoryModelLoad",  # RepositoryIndex (read-only) stays open
    "RepositoryModelUnload",
    "LogSettings",
    "TraceSetting",
)
INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(/versions/[^/]+)?/infer$")
READY_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(/versions/[^/]+)?/ready$")
GRPC_SERVICE = "/inference.GRPCInferenceService/"


class RequestRefused(Exception):
    """A request the guard answers itself: ``status`` (HTTP) and one line."""

    def __init__(
        self,
        message: str,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelLimits:
    """What one served model accepts, from Triton's own model config."""

    name: str
    max_batch: int
    inputs: Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, dims after the batch axis)

    @classmethod
    def from_config(
        cls,
        config: dict,
    ) -> ModelLimits:
        inputs = {
            t["name"]: (t["data_type"].removeprefix("TYPE_"), tuple(int(d) for d in t["dims"])) for t in config.get("input", [])
        }
        return cls(name=config["name"], max_batch=int(config.get("max_batch_size", 0)), inputs=inputs)

    def max_request_bytes(self) -> int:
        """The largest valid JSON request body: every input at max batch, as JSON text."""
        values = sum(max(self.max_batch, 1) * math.prod(dims) for _, dims in self.inputs.values())
        return values * JSON_CHARS_PER_VALUE + HEADER_ALLOWANCE

    def check(
        self,
        name: object,
        datatype: object,
        shape: object,
    ) -> int:
        """The byte size of input ``name`` declared as ``datatype`` ``shape``; RequestRefused when
        the model would not accept it (checked before anything is allocated for it)."""
        if name not in self.inputs:
            raise RequestRefused(f"model {self.name!r} has no input {name!r}: it takes {', '.join(self.inputs)}")
        want_type, dims = self.inputs[name]
        if datatype != want_type:
            raise RequestRefused(f"input {name!r} is {want_type}, got datatype {datatype!r}")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise RequestRefused(f"input {name!r}: shape must be a list of integers, got {shape!r}")
        if any(d < 0 for d in shape):
            raise RequestRefused(f"input {name!r}: shape {list(shape)} has a negative dimension")
        expected = f"[batch, {', '.join(map(str, dims))}]" if self.max_batch else str(list(dims))
        body = tuple(shape[1:]) if self.max_batch else tuple(shape)
        if body != dims or (self.max_batch and len(shape) != len(dims) + 1):
            raise RequestRefused(f"input {name!r}: shape {list(shape)} does not match {expected}")
        if self.max_batch and not 1 <= shape[0] <= self.max_batch:
            raise RequestRefused(f"input {name!r}: batch {shape[0]} is outside 1..{self.max_batch} (the server's --max-batch)")
        return math.prod(shape) * DTYPE_BYTES.get(want_type, 1)


def count_json_values(
    data: object,
) -> int:
    """Number of scalars in a JSON tensor (flat or nested lists); RequestRefused if not numbers."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)):  # bool is an int: BOOL tensors
            count += 1
        else:
            raise RequestRefused(f"tensor data must be numbers, got {type(item).__name__}")
    return count


def check_http_infer(
    limits: ModelLimits,
    body: bytes,
    header_length: str | None,
) -> None:
    """Check one HTTP infer body (JSON, or JSON header + binary tensors when ``header_length`` is
    the ``Inference-Header-Content-Length`` header) against ``limits``."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestRefused(
                f"Inference-Header-Content-Length {header_length!r} is not a length within the {len(body)}-byte body"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestRefused(f"the request is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestRefused("the request's JSON is nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise RequestRefused('the request must be a JSON object with a non-empty "inputs" list')
    binary_total = 0
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict):
            raise RequestRefused("each entry of inputs must be an object with name, datatype, shape")
        name = tensor.get("name")
        size = limits.check(name, tensor.get("datatype"), tensor.get("shape"))
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestRefused(f"input {name!r}: parameters must be an object")
        if "shared_memory_region" in parameters:
            raise RequestRefused("shared memory inputs are not available on this server: send the data", status=403)
        if "binary_data_size" in parameters:
            declared = parameters["binary_data_size"]
            if declared != size:
                raise RequestRefused(
                    f"input {name!r}: binary_data_size {declared!r} but shape {tensor['shape']} needs {size} bytes"
                )
            binary_total += size
        elif "data" in tensor:
            values = count_json_values(tensor["data"])
            if values * DTYPE_BYTES.get(tensor["datatype"], 1) != size:
                raise RequestRefused(f"input {name!r}: {values} values sent for shape {tensor['shape']}")
        else:
            raise RequestRefused(f"input {name!r} has no data and no binary_data_size")
    if binary_total != len(binary):
        raise RequestRefused(f"the binary part is {len(binary)} bytes but the inputs declare {binary_total}")


def check_grpc_infer(
    limits_of: Callable[[str], ModelLimits],
    request: object,
) -> None:
    """Check one gRPC ``ModelInferRequest`` (decoded) the same way."""
    limits = limits_of(request.model_name)
    if not request.inputs:
        raise RequestRefused("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestRefused(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, tensor in enumerate(request.inputs):
        size = limits.check(tensor.name, tensor.datatype, list(tensor.shape))
        if "shared_memory_region" in tensor.parameters:
            raise RequestRefused("shared memory inputs are not available on this server: send the data", status=403)
        if raw:
            sent = len(raw[i])
        else:
            field = GRPC_CONTENTS.get(tensor.datatype)
            sent = len(getattr(tensor.contents, field)) * DTYPE_BYTES[tensor.datatype] if field else -1
        if sent != size:
            raise RequestRefused(
                f"input {tensor.name!r}: {max(sent, 0)} bytes sent for shape {list(tensor.shape)} ({size} bytes)"
            )


class Guard:
    """The public HTTP and gRPC fronts, forwarding checked requests to Triton's private ports.

    ``ready()`` is the supervisor's verdict; ``limits`` is replaced by the supervisor each time Triton
    (re)starts, from the model configs Triton reports."""

    def __init__(
        self,
        upstream_http: str,
        upstream_grpc: str,
        ready: Callable[[], bool],
    ) -> None:
        self.upstream_http = upstream_http
        self.upstream_grpc = upstream_grpc
        self.ready = ready
        self.limits: dict[str, ModelLimits] = {}
        self.max_body = HEADER_ALLOWANCE
        self._session = None
        self._runner = None
        self._grpc_server = None
        self._channel = None

    def set_limits(
        self,
        limits: dict[str, ModelLimits],
    ) -> None:
        self.limits = limits
        self.max_body = max([HEADER_ALLOWANCE, *(m.max_request_bytes() for m in limits.values())])

    def limits_of(
        self,
        model: str,
    ) -> ModelLimits:
        if model not in self.limits:
            raise RequestRefused(f"unknown model {model!r}: this server serves {', '.join(sorted(self.limits))}", status=404)
        return self.limits[model]

    # -- HTTP ------------------------------------------------------------------------------------

    async def start_http(
        self,
        host: str,
        port: int,
        max_body: int,
    ) -> None:
        """Bind the HTTP front (OSError if the port is taken). ``max_body``: aiohttp's own cap, the
        largest valid request of any model (known before Triton starts)."""
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        app = web.Application(client_max_size=max_body)
        app.router.add_route("*", "/{tail:.*}", self._handle_http)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # reuse_address: a restart of colln-serve rebinds at once; two live servers still collide.
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        self._session = ClientSession(connector=TCPConnector(limit=256), timeout=ClientTimeout(total=600), auto_decompress=False)

    async def _handle_http(
        self,
        request,
    ):
        import asyncio  # here, not at the top: the health probe imports this module and none of the server

        from aiohttp import ClientError, web

        path = request.path
        try:
            if not ALLOWED_PATHS.match(path) or path != request.raw_path.split("?", 1)[0]:
                raise RequestRefused(f"{path} is not available on this server", status=403)
            if path == "/v2/health/live":
                # Alive while colln-serve runs, restarts included (it exits when it gives up):
                # a liveness probe must not kill a server that is recovering.
                return web.Response(status=200)
            if path == "/v2/health/ready" or (READY_PATH.match(path) and not self.ready()):
                return web.Response(status=200 if self.ready() else 503)
            if request.headers.get("Content-Encoding", "identity") != "identity":
                # Checked before reading: aiohttp would inflate it (a small body can inflate to gigabytes).
                raise RequestRefused("compressed requests are not accepted: send the body uncompressed", status=415)
            body = await request.read()
            infer = INFER_PATH.match(path)
            if infer and request.method == "POST":
                if not self.ready():
                    raise RequestRefused("the server is not ready (restarting): retry shortly", status=503)
                check_http_infer(self.limits_of(infer["model"]), body, request.headers.get("Inference-Header-Content-Length"))
        except RequestRefused as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        passed = ("content-type", "inference-header-content-length", "accept-encoding")
        headers = {k: v for k, v in request.headers.items() if k.lower() in passed}
        try:
            async with self._session.request(
                request.method,
                f"http://{self.upstream_http}{request.rel_url}",
                data=body,
                headers=headers,
                # Triton compresses its answer only when the client itself asked for it.
                skip_auto_headers=("Accept-Encoding", "Content-Type"),
            ) as answer:
                data = await answer.read()
                keep = ("content-type", "inference-header-content-length", "content-encoding")
                return web.Response(
                    status=answer.status, body=data, headers={k: v for k, v in answer.headers.items() if k.lower() in keep}
                )
        except (ClientError, asyncio.TimeoutError):
            return web.json_response({"error": "the inference server is restarting: retry shortly"}, status=503)

    # -- gRPC ------------------------------------------------------------------------------------

    async def start_grpc(
        self,
        host: str,
        port: int,
        max_body: int,
    ) -> None:
        """Bind the gRPC front (OSError if the port is taken)."""
        import grpc

        options = [("grpc.max_receive_message_length", max_body), ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]
        self._channel = grpc.aio.insecure_channel(
            self.upstream_grpc, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self._grpc_server = grpc.aio.server(options=options)
        self._grpc_server.add_generic_rpc_handlers((_GrpcHandler(self),))
        if self._grpc_server.add_insecure_port(f"{host}:{port}") == 0:
            raise OSError(98, f"port {port} is in use")
        await self._grpc_server.start()

    async def stop(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1)
        if self._channel is not None:
            await self._channel.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


class _GrpcHandler:
    """Every GRPCInferenceService method, forwarded as raw bytes; inference requests checked,
    host-level methods refused, readiness answered from the supervisor's verdict."""

    def __init__(
        self,
        guard: Guard,
    ) -> None:
        self.guard = guard

    def service(
        self,
        details,
    ):
        import grpc

        method = details.method
        if not method.startswith(GRPC_SERVICE):
            return None
        short = method[len(GRPC_SERVICE) :]
        if short == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method, short))

    def _unary(
        self,
        method: str,
        short: str,
    ):
        import grpc
        from tritonclient.grpc import service_pb2

        guard = self.guard

        async def call(request: bytes, context):
            if short in REFUSED_METHODS:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{short} is not available on this server")
            if short == "ServerLive":  # as on HTTP: alive while colln-serve runs, restarts included
                return service_pb2.ServerLiveResponse(live=True).SerializeToString()
            if short in ("ServerReady", "ModelReady") and not guard.ready():
                reply = service_pb2.ServerReadyResponse if short == "ServerReady" else service_pb2.ModelReadyResponse
                return reply(ready=False).SerializeToString()
            if short == "ModelInfer":
                await self._check(request, context)
            try:
                return await guard._channel.unary_unary(method)(request, metadata=_forwardable(context), timeout=600)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return call

    def _stream(
        self,
        method: str,
    ):
        import grpc

        guard = self.guard

        async def call(requests, context):
            async def checked():
                async for request in requests:
                    await self._check(request, context)
                    yield request

            try:
                async for reply in guard._channel.stream_stream(method)(checked(), metadata=_forwardable(context)):
                    yield reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return call

    async def _check(
        self,
        request: bytes,
        context,
    ) -> None:
        import grpc
        from google.protobuf.message import DecodeError
        from tritonclient.grpc import service_pb2

        codes = {403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND}
        try:
            if not self.guard.ready():
                raise RequestRefused("the server is not ready (restarting): retry shortly", status=503)
            check_grpc_infer(self.guard.limits_of, service_pb2.ModelInferRequest.FromString(request))
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a ModelInferRequest")
        except RequestRefused as exc:
            code = grpc.StatusCode.UNAVAILABLE if exc.status == 503 else codes.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, str(exc))


def _forwardable(
    context,
) -> tuple:
    """Client metadata worth passing on (gRPC's own pseudo-headers are not)."""
    return tuple((k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":") and k != "user-agent")


def probe_request(
    limits: ModelLimits,
) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer request of zeros, batch 1, for every input of the model."""
    inputs, data = [], b""
    for name, (datatype, dims) in limits.inputs.items():
        shape = [1, *dims] if limits.max_batch else list(dims)
        size = math.prod(shape) * DTYPE_BYTES[datatype]
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}})
        data += bytes(size)
    header = json.dumps({"inputs": inputs}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
